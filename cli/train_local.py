"""``tenax train-local``: N local worker processes over gloo, no etcd or controller.

Everything is validated before any process starts (the same JobSpec checks the
controller runs, plus the layout and the sample shares). This process then
hosts the rendezvous TCPStore (the agent's role), writes the launch file, starts
``python -m trainer.worker`` N times under the launch contract and waits. If any
rank fails, the others are stopped and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

from common.layout import even_shares, new_plan, partition_for_spec
from common.spec import JobSpec, SpecError, load_spec_text
from protos import launch
from protos.plan import PlanError

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


def register(subparsers) -> None:
    p = subparsers.add_parser("train-local", help="train with N local processes over gloo (no cluster)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="worker processes (must equal dp*pp)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: the config's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the config's)")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0, 1 or 2 (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    p.add_argument("--config", help="job spec YAML (default: built-in tiny GPT on synthetic tokens)")
    p.add_argument("--shares", help="per-dp-rank samples per step, e.g. 5,3 (default: even)")
    p.add_argument("--metrics", required=True, help="JSON-lines metrics file (every rank appends)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is stopped (default 600)")
    p.set_defaults(func=run_cli)


class UsageError(ValueError):
    pass


def build_job(args):
    """(spec, plan) from the CLI arguments, fully validated; UsageError names the problem."""
    from trainer.parallel import ParallelLayout

    raw = {}
    if args.config:
        try:
            raw = load_spec_text(Path(args.config).read_text(), args.config) or {}
        except (OSError, SpecError) as exc:
            raise UsageError(f"--config: cannot read {args.config}: {exc}") from exc
        if not isinstance(raw, dict):
            raise UsageError(f"--config: {args.config} must hold a mapping")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    par = dict(raw.get("parallelism") or {})
    for flag, key in (("dp", "dp"), ("pp", "pp"), ("zero", "zero_stage")):
        if getattr(args, flag) is not None:
            par[key] = getattr(args, flag)
    raw["parallelism"] = par
    raw["resources"] = {**(raw.get("resources") or {}), "workers": args.nproc}
    if args.steps is not None:
        raw["steps"] = args.steps
    try:
        spec = JobSpec.from_dict(raw)
    except SpecError as exc:
        hint = " (--nproc must equal --dp * --pp)" if str(exc).startswith("parallelism:") else ""
        raise UsageError(f"invalid job: {exc}{hint}") from exc
    p = spec.parallelism
    if args.shares:
        try:
            shares = tuple(int(x) for x in args.shares.split(","))
        except ValueError:
            raise UsageError(f"--shares must be comma-separated integers, got {args.shares!r}") from None
        if any(s < 1 for s in shares):
            raise UsageError(f"--shares must all be >= 1, got {args.shares}")
    else:
        shares = even_shares(spec.global_batch_size, p.dp)
    layout = ParallelLayout(dp=p.dp, pp=p.pp, zero_stage=p.zero_stage,
                            layer_partition=partition_for_spec(spec.model, p.pp),
                            sample_shares=shares, micro_batch_size=spec.micro_batch_size)
    try:
        layout.validate(layers=spec.model.layers, global_batch_size=spec.global_batch_size)
    except ValueError as exc:
        raise UsageError(f"invalid layout: {exc}") from exc
    if spec.data.kind == "tokens" and not Path(spec.data.path).is_file():
        raise UsageError(f"data.path: token file {spec.data.path} does not exist")
    try:
        plan = new_plan(job_id=f"local-{spec.name}", generation=1, placement=[("local", r) for r in range(args.nproc)],
                        dp=p.dp, pp=p.pp, zero_stage=p.zero_stage, layer_partition=layout.layer_partition,
                        global_batch_size=spec.global_batch_size, sample_shares=shares, store_address="",
                        reason="train-local")
    except PlanError as exc:
        raise UsageError(f"invalid layout: {exc}") from exc
    return spec, plan


def launch_workers(spec, plan, *, metrics: str, run_dir: str, timeout_s: float, env_extra: dict | None = None) -> int:
    """Host a TCPStore, start every rank, wait; returns 0 or the first failing exit code."""
    import dataclasses

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    plan = dataclasses.replace(plan, store_address=f"127.0.0.1:{store.port}")
    launch_file = Path(run_dir) / "launch.json"
    launch_file.write_text(json.dumps({"spec": spec.to_dict(), "plan": plan.to_dict()}))
    base_env = {**os.environ, launch.JOB_ID: plan.job_id, launch.LAUNCH_FILE: str(launch_file),
                launch.METRICS_FILE: metrics, launch.RUN_DIR: run_dir, **(env_extra or {})}
    repo = str(Path(__file__).resolve().parent.parent)
    base_env["PYTHONPATH"] = repo + os.pathsep + base_env.get("PYTHONPATH", "")
    def rank_env(w) -> dict:
        env = {**base_env, launch.RANK: str(w.rank)}
        if spec.resources.device == "cuda" and "CUDA_VISIBLE_DEVICES" not in (env_extra or {}):
            env["CUDA_VISIBLE_DEVICES"] = str(w.slot)  # one GPU per rank, as an agent does
        return env

    procs = [
        subprocess.Popen([sys.executable, "-m", "trainer.worker"], env=rank_env(w), start_new_session=True)
        for w in plan.workers
    ]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                print(f"train-local: a worker exited with code {failed[0]}; stopping the others", file=sys.stderr)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if time.monotonic() > deadline:
                print(f"train-local: run exceeded --timeout {timeout_s:.0f}s; stopping workers", file=sys.stderr)
                return 124
            time.sleep(0.05)
    finally:
        _stop(procs)
        del store


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            with _suppress():
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, ProcessLookupError)


def run_cli(args) -> int:
    try:
        spec, plan = build_job(args)
    except UsageError as exc:
        print(f"tenax train-local: error: {exc}", file=sys.stderr)
        return 2
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(args.metrics).write_text("")  # a fresh file per run
    with tempfile.TemporaryDirectory(prefix="tenax-local-") as run_dir:
        print(f"train-local: {plan.world_size} workers, dp={plan.dp} pp={plan.pp} zero={plan.zero_stage} "
              f"partition={list(plan.layer_partition)} shares={list(plan.sample_shares)} steps={spec.steps}",
              file=sys.stderr)
        code = launch_workers(spec, plan, metrics=args.metrics, run_dir=run_dir, timeout_s=args.timeout)
    if code == 0:
        last = _last_loss(args.metrics)
        print(f"train-local: done; final loss {last}" if last is not None else "train-local: done", file=sys.stderr)
    return code


def _last_loss(path: str):
    from trainer.telemetry import read_step_records

    rank0 = [rec for rec in read_step_records(path) if rec.get("rank") == 0]
    return rank0[-1]["loss"] if rank0 else None


def main(argv: list[str] | None = None) -> int:
    """``python -m cli.train_local train-local ...``: the same command without the `tenax` dispatcher."""
    parser = argparse.ArgumentParser(prog="python -m cli.train_local")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
