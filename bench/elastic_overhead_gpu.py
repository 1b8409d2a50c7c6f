"""Steady-state cost of the elastic runtime and of per-step snapshots with the real trainer on a GPU.

    python3 bench/elastic_overhead_gpu.py --dp 1                   # one rank: the snapshot copy alone
    python3 bench/elastic_overhead_gpu.py --dp 2 --d-model 512     # two ranks on one GPU, replicated

The job is a GPT (``--d-model``/``--layers``, seq 512, bf16 autocast on CUDA), ZeRO-0,
``--dp`` data-parallel worker processes on one GPU. With two, they sit on two pretend
nodes (so each rank's buddy is off-node) and talk gloo with CUDA tensors
(``TENAX_BACKEND=gloo``: NCCL refuses two ranks on one GPU; gloo has no CUDA
send/recv, so pipeline layouts cannot run this way). The gradient all-reduce then goes
through host memory and TCP, so dp2 steps are far slower than over NCCL and the
ratios are diluted; ``--dp 1`` gives the undiluted cost of the snapshot copy (there is
no off-node buddy to replicate to). The control side is tests/helpers/elastic_harness.py (a
real etcd, a rendezvous store in this process, plans written like the controller).

Three variants, run interleaved ``--rounds`` times (drifting load hits all alike):
``plain`` (TENAX_ELASTIC=0: no abort watcher, no plan watch, no snapshots),
``no-snapshots`` (the elastic runtime, TENAX_SNAPSHOTS=0) and ``snapshots`` (the
defaults: a snapshot every step to pinned host memory on a side stream, checksummed,
replicated to the buddy in the background). Reported: the median step time of each
(steps after ``--warmup``; ``step_time`` inside the step, and end to end between two
steps' ends, which also counts the boundary work), the ratios against plain, and for ``snapshots`` the median
lag between a step and the newest step with an off-node copy (``recoverable_step``),
which says how often replication actually kept up: a snapshot whose buffer is still
being sent is skipped, never waited for. Each round also runs the defaults with
``snapshot_every: 2`` (``within_run``): steps that carry a snapshot against the steps of
the same process that do not, which the run-to-run spread does not blur.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.embedded_etcd import start_etcd  # noqa: E402
from protos import launch  # noqa: E402
from tests.helpers.elastic_harness import ElasticJob  # noqa: E402
from common.spec import JobSpec  # noqa: E402

VARIANTS = {"plain": {launch.ELASTIC: "0"}, "no-snapshots": {launch.SNAPSHOTS: "0"}, "snapshots": {}}


def within_run(step_lines: list[dict]) -> tuple[list[float], list[float]]:
    """From a run with ``snapshot_every: 2``: (step_time of the steps right after a snapshot
    boundary, step_time of the others). The copy and its checksum run on a side stream during
    the step after the boundary, so the pair compares steps with and without one in the same
    process, free of the run-to-run spread between processes (±10 % here)."""
    after, other = [], []
    for prev, line in zip(step_lines, step_lines[1:]):
        (after if prev["step"] % 2 == 0 else other).append(line["step_time"])
    return after, other


def gpu_spec(*, dp: int, d_model: int, layers: int, steps: int, micro: int, batch: int,
             snapshot_every: str = "1") -> JobSpec:
    return JobSpec.from_dict({
        "name": "gpu-overhead", "seed": 3, "steps": steps, "global_batch_size": batch, "micro_batch_size": micro,
        "model": {"arch": "gpt", "layers": layers, "d_model": d_model, "heads": max(1, d_model // 64),
                  "vocab_size": 8192, "seq_len": 512, "dropout": 0.0},
        "data": {"kind": "synthetic", "num_samples": 1 << 16},
        "optimizer": {"lr": 3e-4, "warmup_steps": 2},
        "parallelism": {"dp": dp, "pp": 1, "zero_stage": 0},
        "elastic": {"min_workers": 1, "max_workers": dp, "snapshot_every": snapshot_every},
        "resources": {"workers": dp, "device": "cuda"},
    })


def one_run(spec: JobSpec, etcd_url: str, out: Path, variant: str, run: int, warmup: int) -> dict:
    env = {launch.BACKEND: "gloo", launch.COLLECTIVE_TIMEOUT_S: "120", **VARIANTS.get(variant, {})}
    job = ElasticJob(spec, out, etcd_url, job=f"{variant}-{run}", env=env)
    try:
        job.start()
        codes = job.wait_all(timeout_s=540)
    finally:
        job.close()
    if set(codes.values()) != {0}:
        raise RuntimeError(f"{variant} run {run} failed: {codes}\n{job.logs()}")
    lines = [r for r in job.steps("a", 0) if r["step"] > warmup]
    if variant == "alternate":
        after, other = within_run(lines)
        return {"after": after, "other": other}
    lag = [r["step"] - r["recoverable_step"] for r in lines if "recoverable_step" in r]
    # end to end: also what happens between two steps (the snapshot boundary, a replication
    # round that must finish), which ``step_time`` (inside train_step) does not see
    ends = [r["time"] for r in lines]
    return {"step_times": [r["step_time"] for r in lines], "lag": lag,
            "end_to_end": [b - a for a, b in zip(ends, ends[1:])],
            "phases": {p: [r.get(p, 0.0) for r in lines] for p in PHASES}}


PHASES = ("forward_time", "backward_time", "collective_time", "optimizer_time")
"""Parts of ``step_time`` in the step lines: which one a variant's extra time lands in."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--snapshot-every", default="1",
                    help="the snapshots variant's snapshot_every: a number of steps or auto")
    args = ap.parse_args()
    spec = gpu_spec(dp=args.dp, d_model=args.d_model, layers=args.layers, steps=args.steps, micro=args.micro, batch=args.batch,
                    snapshot_every=args.snapshot_every)
    alternate = gpu_spec(dp=args.dp, d_model=args.d_model, layers=args.layers, steps=args.steps, micro=args.micro,
                         batch=args.batch, snapshot_every="2")
    pairs: dict[str, list[float]] = {"after": [], "other": []}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    e2e: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lags: list[int] = []
    phases: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tenax-gpu-overhead-") as tmp:
        root = Path(tmp)
        etcd = start_etcd(root / "etcd", log_path=root / "etcd.log")
        try:
            for run in range(args.rounds):
                got = one_run(alternate, etcd.url, root / f"alternate-{run}", "alternate", run, args.warmup)
                pairs["after"] += got["after"]
                pairs["other"] += got["other"]
                print(f"round {run} alternate: after a snapshot {statistics.median(got['after']):.4f} s, "
                      f"others {statistics.median(got['other']):.4f} s", file=sys.stderr, flush=True)
                for variant in VARIANTS:
                    got = one_run(spec, etcd.url, root / f"{variant}-{run}", variant, run, args.warmup)
                    times[variant] += got["step_times"]
                    e2e[variant] += got["end_to_end"]
                    for p in PHASES:
                        phases[variant][p] += got["phases"][p]
                    if variant == "snapshots":
                        lags += got["lag"]
                    print(f"round {run} {variant:12s} median step {statistics.median(got['step_times']):.4f} s",
                          file=sys.stderr, flush=True)
        finally:
            etcd.kill()
    med = {v: statistics.median(t) for v, t in times.items()}
    med_e2e = {v: statistics.median(t) for v, t in e2e.items()}
    print(json.dumps({
        "model": {"d_model": args.d_model, "layers": args.layers, "seq_len": 512, "vocab": 8192,
                  "micro": args.micro, "batch": args.batch, "layout": f"dp{args.dp} zero0 on one GPU" + (", gloo" if args.dp > 1 else "")},
        "median_step_s": med,
        "elastic_no_snapshots_over_plain": med["no-snapshots"] / med["plain"],
        "snapshots_every_step_over_plain": med["snapshots"] / med["plain"],
        "median_end_to_end_s": med_e2e,
        "snapshots_over_plain_end_to_end": med_e2e["snapshots"] / med_e2e["plain"],
        "median_phase_s": {v: {p: round(statistics.median(x), 5) for p, x in ph.items()} for v, ph in phases.items()},
        "within_run": {
            "snapshot_step_s": statistics.median(pairs["after"]), "plain_step_s": statistics.median(pairs["other"]),
            "snapshot_step_over_plain_step": statistics.median(pairs["after"]) / statistics.median(pairs["other"]),
            "pairs": len(pairs["after"])},
        "snapshot_every": args.snapshot_every,
        "recoverable_lag_steps_median": statistics.median(lags) if lags else None,
        "steps_measured_per_variant": {v: len(t) for v, t in times.items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
