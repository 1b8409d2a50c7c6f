"""Where a worker's CPU goes, per thread, with and without the elastic runtime and snapshots.

    .venv/bin/python bench/thread_cpu.py                       # plain, no-snapshots, snapshots
    .venv/bin/python bench/thread_cpu.py --variants snapshots --window-s 10

Wall-clock ratios between separate runs scatter by 10-30% on a saturated 2-core
host (bench/mttr.py), which hides a few percent. This counts the work instead:
the same dp4 tiny-GPT job as bench/mttr.py (two pretend nodes, gloo, replicated
snapshots every step), and once rank 0 is past ``--from-step``, the CPU time
(user + system) of each of its threads is read from /proc at the start and the
end of a ``--window-s`` window. Printed per variant: CPU milliseconds per step of
the whole process and of its busiest threads (Python threads share the name
``python``; the main thread is marked), context switches per step, and the median
``boundary_cpu_s`` of the step lines (the training thread's CPU time in the
snapshot boundary: finish the last replication round, snapshot, post the next).
One window per variant: windows of one variant differ by ~2 ms per step between
runs, so compare the threads rather than the totals.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common.embedded_etcd import start_etcd  # noqa: E402
from protos import launch  # noqa: E402
from mttr import example_spec  # noqa: E402
from tests.helpers.elastic_harness import ElasticJob  # noqa: E402

VARIANTS = {"plain": {launch.ELASTIC: "0"}, "no-snapshots": {launch.SNAPSHOTS: "0"}, "snapshots": {}}
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, float, int]]:
    """{tid: (name, CPU seconds, context switches)} of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime + stime
        switches = sum(int(line.split(":")[1]) for line in status.splitlines() if "ctxt_switches:" in line)
        out[int(tid)] = (name, cpu, switches)
    return out


def measure(etcd_url: str, out: Path, variant: str, from_step: int, window_s: float, steps: int) -> dict:
    job = ElasticJob(example_spec(dp=4, pp=1, steps=steps), out, etcd_url, job=f"cpu-{variant}",
                     env=VARIANTS[variant])
    try:
        job.start()
        deadline = time.monotonic() + 120
        while not job.steps("a", 0) or job.steps("a", 0)[-1]["step"] < from_step:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: rank 0 did not reach step {from_step}\n{job.logs()}")
            time.sleep(0.1)
        pid = job.procs[("a", 0)].pid
        before, first = thread_times(pid), job.steps("a", 0)[-1]["step"]
        time.sleep(window_s)
        after, last = thread_times(pid), job.steps("a", 0)[-1]["step"]
        lines = job.steps("a", 0)
    finally:
        job.close()
    n = max(1, last - first)
    threads = sorted(((after[t][1] - before[t][1]) / n, after[t][0] + (" (main)" if t == pid else ""),
                      (after[t][2] - before[t][2]) / n) for t in after if t in before)[::-1]
    boundary = [r["boundary_cpu_s"] for r in lines if "boundary_cpu_s" in r and first < r["step"] <= last]
    return {"steps": n, "cpu_ms_per_step": 1e3 * sum(t[0] for t in threads), "threads": threads,
            "boundary_cpu_ms": 1e3 * statistics.median(boundary) if boundary else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="plain,no-snapshots,snapshots")
    ap.add_argument("--from-step", type=int, default=40)
    ap.add_argument("--window-s", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=400, help="job length (the window must end before it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tenax-thread-cpu-") as tmp:
        root = Path(tmp)
        etcd = start_etcd(root / "etcd", log_path=root / "etcd.log")
        try:
            for variant in args.variants.split(","):
                got = measure(etcd.url, root / variant, variant, args.from_step, args.window_s, args.steps)
                boundary = f"{got['boundary_cpu_ms']:.3f} ms" if got["boundary_cpu_ms"] is not None else "-"
                print(f"== {variant}: {got['steps']} steps, {got['cpu_ms_per_step']:.2f} ms CPU per step, "
                      f"snapshot boundary on the training thread {boundary}")
                for cpu, name, switches in got["threads"]:
                    if cpu >= 5e-5:
                        print(f"   {name:22s} {cpu * 1e3:6.2f} ms  {switches:6.1f} context switches")
        finally:
            etcd.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
