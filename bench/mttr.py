"""MTTR of in-place recovery after kill -9 of one worker, and the steady-state cost of snapshots.

    .venv/bin/python bench/mttr.py                       # everything, median of 5 (a few minutes on 2 cores)
    .venv/bin/python bench/mttr.py --trials 1 --skip-overhead
    .venv/bin/python bench/mttr.py --torchrun --kills between --scenarios dp4 --skip-overhead   # + baseline

The job is examples/tiny-gpt.yaml (4 workers, gloo, CPU) on two pretend nodes,
default settings (snapshot every step, replicated to a buddy on the other node).
The script plays the control side (tests/elastic_harness.py): it serves the
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
and with the defaults (snapshots every step, replicated); median step time of
steps 6.., runs interleaved, ratios against plain DDP.
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

from controller.embedded_etcd import start_etcd  # noqa: E402
from tests.elastic_harness import ElasticJob  # noqa: E402
from trainer.config import JobSpec  # noqa: E402

KILL_STEP = 5


def example_spec(*, dp: int, pp: int, steps: int) -> JobSpec:
    raw = yaml.safe_load((REPO / "examples" / "tiny-gpt.yaml").read_text())
    raw["steps"] = steps
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


def step_times(etcd_url: str, out: Path, variant: str, steps: int, run: int) -> list[float]:
    spec = example_spec(dp=4, pp=1, steps=steps)
    env = {"plain": {"TENAX_ELASTIC": "0"}, "no-snapshots": {"TENAX_SNAPSHOTS": "0"}, "snapshots": {}}[variant]
    job = ElasticJob(spec, out, etcd_url, job=f"overhead-{variant}-{run}", env=env)
    try:
        job.start()
        codes = job.wait_all(timeout_s=300)
    finally:
        job.close()
    if set(codes.values()) != {0}:
        raise RuntimeError(f"overhead run {variant} failed\n{job.logs()}")
    return [r["step_time"] for r in job.steps("a", 0) if r["step"] > 5]


def overhead(etcd_url: str, root: Path, steps: int, rounds: int) -> dict:
    times: dict[str, list[float]] = {"plain": [], "no-snapshots": [], "snapshots": []}
    for run in range(rounds):  # interleaved, so drifting load from other processes hits all alike
        for variant in times:
            times[variant] += step_times(etcd_url, root / f"overhead-{variant}-{run}", variant, steps, run)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {
        "median_step_s": med,
        "elastic_no_snapshots_over_plain": med["no-snapshots"] / med["plain"],
        "snapshots_every_step_over_plain": med["snapshots"] / med["plain"],
        "snapshots_over_no_snapshots": med["snapshots"] / med["no-snapshots"],
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
                result["overhead"] = overhead(etcd.url, root, args.overhead_steps, args.overhead_rounds)
        finally:
            etcd.kill()
    print(json.dumps(result, indent=2, sort_keys=True, default=lambda o: dataclasses.asdict(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
