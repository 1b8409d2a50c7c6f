"""MTTR of in-place recovery after kill -9 of one worker, and the steady-state cost of snapshots.

    .venv/bin/python bench/mttr.py                       # everything, median of 5 (a few minutes on 2 cores)
    .venv/bin/python bench/mttr.py --trials 1 --skip-overhead
    .venv/bin/python bench/mttr.py --torchrun --kills between --scenarios dp4 --skip-overhead   # + baseline

The job is examples/tiny-gpt.yaml (4 workers, gloo, CPU) on two pretend nodes,
default settings (snapshot every step, replicated to a buddy on the other node).
The script plays the control side (tests/helpers/elastic_harness.py): it serves the
rendezvous store, polls the workers every 2 ms, and writes plan g+1 with
controller/replan.py the moment it sees the victim's exit. The victim kills
itself with SIGKILL (TENAX_FAULT) once its last step is replicated, either
between two steps or ~20 ms into the next one, and notes the time first.

MTTR parts per recovery (seconds, medians over trials):

    detection  kill -> the exit seen by the script (in a cluster the agent sees a
               child's exit in ~5 ms and reports it through etcd)
    plan       exit seen -> plan g+1 decided and written to etcd
    rebuild    slowest survivor: rendezvous of g+1 + model rebuild for the new layout
    transfer   slowest survivor: copy inventory, resharding transfers, import
    total      kill -> the slowest survivor ready to run its next step

Scenarios: ``dp2pp2`` (zero 1; loses a rank: dp2·pp2 -> dp1·pp2, ZeRO shards
re-partitioned, one survivor idle) and ``dp4`` (pure data parallel: dp4 -> dp3,
global batch kept at 16 by new sample shares).

torchrun baseline (``--torchrun``): the same dp4 job under ``torchrun
--max-restarts=3`` (bench/torchrun_worker.py), a checkpoint every 10 steps, rank
3 killed at step 15: every process restarts and reloads; ``total`` is kill ->
every rank restored, ``first_step_done`` kill -> the first step after it done.

Overhead: the same dp4 job run as plain DDP (TENAX_ELASTIC=0), as the elastic
runtime with snapshots off (TENAX_SNAPSHOTS=0: abortable waits + plan watch),
and with the defaults (snapshots every step, replicated); runs interleaved,
ratios against plain DDP, of two measures of steps 6..:

    median_step_s      wall time from the end of one step to the end of the next
                       (rank 0's step lines): the step and everything between two
                       steps, where the snapshot and the replication round run
                       (the lines' own ``step_time`` covers the step alone, so it
                       would miss them; it is reported as median_step_time_s)
    cpu_per_step_s     CPU time (user + system, every thread) a worker spends per
                       step, sampled with psutil every 10 ms and read at the steps'
                       end times: what the runtime costs the machine, steadier
                       than wall time when other processes compete for the cores

Runs of the same variant differ by up to ±10-30 % in median step on 2 cores
(measured: 4 runs of plain DDP gave 50-81 ms on an otherwise idle machine), so
the three-variant ratios need many rounds. Each round therefore also runs the
defaults with ``snapshot_every: 2``: within that one run, a step that follows a
snapshot boundary carries one snapshot and one replication round (the boundary
work and the bytes moving during the step) and the next step carries none, so
``within_run.snapshot_step_over_plain_step`` (median over all such pairs) is the
cost of a snapshot + replication round per step against the same run's other
steps, free of the run-to-run spread. ``--pin`` puts node a's workers on the
first usable core and node b's on the second (it did not reduce the spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from common.embedded_etcd import start_etcd  # noqa: E402
from protos import launch  # noqa: E402
from tests.helpers.elastic_harness import ElasticJob  # noqa: E402
from common.spec import JobSpec  # noqa: E402

KILL_STEP = 5


def example_spec(*, dp: int, pp: int, steps: int, snapshot_every: str | None = None) -> JobSpec:
    raw = yaml.safe_load((REPO / "examples" / "tiny-gpt.yaml").read_text())
    raw["steps"] = steps
    if snapshot_every is not None:
        raw["elastic"] = {**raw["elastic"], "snapshot_every": snapshot_every}
    raw["parallelism"] = {**raw["parallelism"], "dp": dp, "pp": pp}
    raw["resources"] = {**raw["resources"], "workers": dp * pp}
    return JobSpec.from_dict(raw)


SCENARIOS = {"dp2pp2": dict(dp=2, pp=2), "dp4": dict(dp=4, pp=1)}


def one_recovery(etcd_url: str, out: Path, scenario: str, when: str, trial: int) -> dict:
    spec = example_spec(**SCENARIOS[scenario], steps=KILL_STEP + 4)
    job = ElasticJob(spec, out, etcd_url, job=f"{scenario}-{when}-{trial}")
    try:
        job.start(faults=f"rank=3,step={KILL_STEP},kind=kill,when={when}")
        dead, _, seen = job.wait_for_death(timeout_s=120)
        plan = job.replan_without({job.plan_rank(dead)})
        written = job.write_plan(plan)
        codes = job.wait_all(timeout_s=120)
    finally:
        job.close()
    if any(code != 0 for where, code in codes.items() if where != dead):
        raise RuntimeError(f"{scenario}/{when}: a survivor failed\n{job.logs()}")
    killed_at = float(next(job.run_dir.glob("killed-*")).read_text())
    records = [r for w in job.procs if w != dead for r in job.recoveries(*w)]
    return {
        "detection_s": seen - killed_at,
        "plan_s": written - seen,
        "rebuild_s": max(r["rebuild_s"] for r in records),
        "transfer_s": max(r["transfer_s"] for r in records),
        "total_s": max(r["time"] for r in records) - killed_at,
        "worker_noticed_to_ready_s": max(r["total_s"] for r in records),
        "steps_lost": max(r["steps_lost"] for r in records),
        "bytes_moved": sum(r["bytes_moved"] for r in records),
        "layout": f"{records[0]['old_layout']} -> {records[0]['new_layout']}",
    }


def median_of(trials: list[dict]) -> dict:
    out = {k: statistics.median(t[k] for t in trials) for k in trials[0] if isinstance(trials[0][k], (int, float))}
    out["layout"] = trials[0]["layout"]
    out["trials"] = len(trials)
    out["max_total_s"] = max(t["total_s"] for t in trials)
    return out


class CpuSampler:
    """The CPU time (user + system, every thread) of each worker process, sampled every
    ``interval_s`` on a thread; ``per_step`` reads it off at two step-end times."""

    def __init__(self, procs: dict, interval_s: float = 0.01) -> None:
        import threading

        import psutil

        self._procs = {where: psutil.Process(p.pid) for where, p in procs.items()}
        self._samples: dict = {where: [] for where in procs}
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for where, proc in self._procs.items():
                try:
                    cpu = proc.cpu_times()
                except psutil.Error:  # exited
                    continue
                self._samples[where].append((time.time(), cpu.user + cpu.system))
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, where, t: float) -> float | None:
        """CPU seconds of ``where`` at unix time ``t`` (linear between the samples around it)."""
        samples = self._samples[where]
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c0
        return None

    def per_step(self, where, first: dict, last: dict) -> float | None:
        a, b = self.at(where, first["time"]), self.at(where, last["time"])
        if a is None or b is None or last["step"] <= first["step"]:
            return None
        return (b - a) / (last["step"] - first["step"])


def pin_workers(job: ElasticJob) -> None:
    """Node a's workers on the first usable core, node b's on the second (see the docstring)."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    for (node, _), p in job.procs.items():
        os.sched_setaffinity(p.pid, {cores[0] if node == "a" else cores[1]})


def step_times(etcd_url: str, out: Path, variant: str, steps: int, run: int,
               pin: bool = False) -> tuple[list[float], list[float], list[float], list[dict]]:
    """(periods between the ends of rank 0's steps 5.., their step_time, CPU seconds per step
    of each worker over steps 5.., rank 0's step lines 5..)."""
    spec = example_spec(dp=4, pp=1, steps=steps, snapshot_every="2" if variant == "alternate" else None)
    env = {"plain": {launch.ELASTIC: "0"}, "no-snapshots": {launch.SNAPSHOTS: "0"}, "snapshots": {},
           "alternate": {}}[variant]
    job = ElasticJob(spec, out, etcd_url, job=f"overhead-{variant}-{run}", env=env)
    sampler = None
    try:
        job.start()
        if pin:
            pin_workers(job)
        sampler = CpuSampler(job.procs)
        codes = job.wait_all(timeout_s=300)
    finally:
        if sampler is not None:
            sampler.stop()
        job.close()
    if set(codes.values()) != {0}:
        raise RuntimeError(f"overhead run {variant} failed\n{job.logs()}")
    cpu = []
    for where in job.procs:
        lines = [r for r in job.steps(*where) if r["step"] >= 5]
        per_step = sampler.per_step(where, lines[0], lines[-1]) if len(lines) > 1 else None
        if per_step is not None:
            cpu.append(per_step)
    lines = [r for r in job.steps("a", 0) if r["step"] >= 5]
    periods = [b["time"] - a["time"] for a, b in zip(lines, lines[1:])]
    return periods, [r["step_time"] for r in lines[1:]], cpu, lines


def within_run(etcd_url: str, out: Path, steps: int, run: int, pin: bool) -> tuple[list[float], list[float]]:
    """One run with ``snapshot_every: 2``: (periods of the steps after a snapshot boundary, the
    periods of the steps after the others). Step s's period runs from the end of step s-1:
    it holds boundary s-1's work and the replication round it started."""
    _, _, _, lines = step_times(etcd_url, out, "alternate", steps, run, pin)
    after, plain = [], []
    for a, b in zip(lines, lines[1:]):
        (after if a["step"] % 2 == 0 else plain).append(b["time"] - a["time"])
    return after, plain


def overhead(etcd_url: str, root: Path, steps: int, rounds: int, pin: bool = False) -> dict:
    times: dict[str, list[float]] = {"plain": [], "no-snapshots": [], "snapshots": []}
    inside: dict[str, list[float]] = {v: [] for v in times}
    cpu: dict[str, list[float]] = {v: [] for v in times}
    pairs: dict[str, list[float]] = {"after": [], "other": []}
    rounds_out: list[dict] = []
    for run in range(rounds):  # interleaved, so drifting load from other processes hits all alike
        this_round = {}
        after, other = within_run(etcd_url, root / f"overhead-alternate-{run}", steps, run, pin)
        pairs["after"] += after
        pairs["other"] += other
        for variant in times:
            wall, step_time, per_step, _ = step_times(etcd_url, root / f"overhead-{variant}-{run}", variant, steps,
                                                      run, pin)
            times[variant] += wall
            inside[variant] += step_time
            cpu[variant] += per_step
            this_round[variant] = (statistics.median(wall), statistics.median(per_step))
        rounds_out.append({
            "within_run_snapshot_step_over_plain_step": statistics.median(after) / statistics.median(other),
            "snapshots_over_plain_wall": this_round["snapshots"][0] / this_round["plain"][0],
            "snapshots_over_plain_cpu": this_round["snapshots"][1] / this_round["plain"][1],
            "no_snapshots_over_plain_wall": this_round["no-snapshots"][0] / this_round["plain"][0],
            "no_snapshots_over_plain_cpu": this_round["no-snapshots"][1] / this_round["plain"][1],
        })
        print(f"overhead round {run}: " + "  ".join(f"{k}={v:.3f}" for k, v in rounds_out[-1].items()),
              file=sys.stderr, flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    med_cpu = {v: statistics.median(c) for v, c in cpu.items()}
    return {
        "median_step_s": med,
        "median_step_time_s": {v: statistics.median(t) for v, t in inside.items()},
        "elastic_no_snapshots_over_plain": med["no-snapshots"] / med["plain"],
        "snapshots_every_step_over_plain": med["snapshots"] / med["plain"],
        "snapshots_over_no_snapshots": med["snapshots"] / med["no-snapshots"],
        "cpu_per_step_s": med_cpu,
        "cpu_elastic_no_snapshots_over_plain": med_cpu["no-snapshots"] / med_cpu["plain"],
        "cpu_snapshots_every_step_over_plain": med_cpu["snapshots"] / med_cpu["plain"],
        "within_run": {
            "snapshot_step_s": statistics.median(pairs["after"]),
            "plain_step_s": statistics.median(pairs["other"]),
            "snapshot_step_over_plain_step": statistics.median(pairs["after"]) / statistics.median(pairs["other"]),
            "pairs": len(pairs["after"]),
        },
        "rounds": rounds_out,
        "steps_measured_per_variant": {v: len(t) for v, t in times.items()},
    }


TORCHRUN_KILL_STEP = 15
"""With a checkpoint every 10 steps, a kill at step 15 redoes 5 steps (the issue's torchrun scenario)."""


def torchrun_recovery(out: Path) -> dict:
    """torchrun --max-restarts=3, default settings, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (without it
    torch 2.13's restarted agent cannot re-rendezvous): every process restarts and reloads from disk."""
    import os
    import socket
    import subprocess

    out.mkdir(parents=True)
    spec = example_spec(dp=4, pp=1, steps=TORCHRUN_KILL_STEP + 4)
    (out / "spec.json").write_text(json.dumps(spec.to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "BENCH_SPEC": str(out / "spec.json"), "BENCH_OUT": str(out), "BENCH_KILL_STEP": str(TORCHRUN_KILL_STEP)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=3",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(REPO / "bench" / "torchrun_worker.py")]
    with open(out / "torchrun.log", "wb") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300, cwd=str(REPO)).returncode
    if code != 0:
        raise RuntimeError(f"torchrun failed ({code}): {(out / 'torchrun.log').read_text()[-2000:]}")
    killed = float((out / "killed").read_text())
    lines = [json.loads(line) for f in out.glob("metrics-*.jsonl") for line in f.read_text().splitlines() if line]
    restored = [r for r in lines if r.get("event") == "restored"]
    resumed = restored[0]["resumed_step"]
    first_after = [r["time"] for r in lines if r.get("step") == resumed + 1 and r.get("time", 0) > killed]
    return {"total_s": max(r["time"] for r in restored) - killed,
            "first_step_done_s": max(first_after) - killed,
            "steps_redone": TORCHRUN_KILL_STEP - resumed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--scenarios", default="dp2pp2,dp4")
    ap.add_argument("--kills", default="between,mid")
    ap.add_argument("--overhead-steps", type=int, default=40)
    ap.add_argument("--overhead-rounds", type=int, default=2)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-mttr", action="store_true")
    ap.add_argument("--pin", action="store_true", help="pin the overhead runs' workers, node a / node b per core")
    ap.add_argument("--torchrun", action="store_true", help="also the torchrun --max-restarts baseline")
    args = ap.parse_args()
    result: dict = {"job": "examples/tiny-gpt.yaml", "kill_step": KILL_STEP}
    with tempfile.TemporaryDirectory(prefix="tenax-mttr-") as tmp:
        root = Path(tmp)
        etcd = start_etcd(root / "etcd", log_path=root / "etcd.log")
        try:
            if not args.skip_mttr:
                result["mttr"] = {}
                for scenario in args.scenarios.split(","):
                    for when in args.kills.split(","):
                        trials = [one_recovery(etcd.url, root / f"{scenario}-{when}-{i}", scenario, when, i)
                                  for i in range(args.trials)]
                        result["mttr"][f"{scenario}/{when}"] = median_of(trials)
                        print(f"{scenario:7s} kill {when:8s} " + "  ".join(
                            f"{k.removesuffix('_s')}={v:.3f}" for k, v in result["mttr"][f"{scenario}/{when}"].items()
                            if k.endswith("_s")), file=sys.stderr, flush=True)
            if args.torchrun:
                runs = [torchrun_recovery(root / f"torchrun-{i}") for i in range(args.trials)]
                result["torchrun"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                result["torchrun"]["trials"] = len(runs)
                if "mttr" in result and "dp4/between" in result["mttr"]:
                    result["torchrun_over_tenax_dp4"] = (result["torchrun"]["total_s"]
                                                         / result["mttr"]["dp4/between"]["total_s"])
            if not args.skip_overhead:
                result["overhead"] = overhead(etcd.url, root, args.overhead_steps, args.overhead_rounds,
                                              pin=args.pin)
        finally:
            etcd.kill()
    print(json.dumps(result, indent=2, sort_keys=True, default=lambda o: dataclasses.asdict(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
