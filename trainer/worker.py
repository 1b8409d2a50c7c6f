"""``python -m trainer.worker``: one training rank, launched by an agent (or train-local).

Launch contract (see protos/plan.py): TENAX_LAUNCH_FILE holds
{"spec": JobSpec dict, "plan": Plan dict}; TENAX_RANK is this worker's global
rank; TENAX_METRICS_FILE receives one JSON line per step; TENAX_RUN_DIR is the
per-job directory. The rendezvous store is the TCPStore at plan.store_address,
under plan.store_prefix. The plan (not spec.parallelism) is authoritative for
the layout, since the controller changes it as the world changes.

Elastic by default (trainer/elastic.py): with TENAX_ETCD set, the worker follows
the job's plan in etcd and survives failures of its peers in process; it exits 0
after the last step or when a new generation has no place for it. TENAX_FAULT
injects failures (tests). TENAX_ELASTIC=0 runs the plain single-generation
trainer; TENAX_SNAPSHOTS=0 keeps the elastic runtime without snapshots (both
for benchmarks). TENAX_PLAN_WAIT_S (default 60) bounds the wait for plan g+1.

Two-phase growth: the agent sets TENAX_GROWTH_ID for a worker it starts for a
growth being prepared (the launch plan is the tentative plan g+1). The worker gets
ready, writes a READY joiner record to etcd, and joins only once a plan >= g+1 in
etcd names its (node, slot); it exits 0 if none does within TENAX_PREPARE_WAIT_S
(default 300).

Exit codes: 0 after the last step; 2 for a bad launch (env, spec, plan);
1 for a failure while training. Every blocking call has a timeout:
TENAX_STORE_TIMEOUT_S (default 30) for the store, TENAX_COLLECTIVE_TIMEOUT_S
(default 60) for process-group init and collectives.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from datetime import timedelta

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


class LaunchError(Exception):
    """The launch environment, spec or plan is unusable (exit code 2)."""


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise LaunchError(f"environment variable {name} is not set")
    return value


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise LaunchError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise LaunchError(f"{name} must be > 0, got {value}")
    return value


def load_launch():
    """(spec, plan, rank, layout) from the environment; LaunchError if anything is off."""
    from protos.plan import Plan, PlanError
    from common.spec import JobSpec, SpecError
    from trainer.parallel import ParallelLayout

    path = _env("TENAX_LAUNCH_FILE")
    try:
        with open(path) as f:
            launch = json.load(f)
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read launch file {path}: {exc}") from exc
    if not isinstance(launch, dict) or "spec" not in launch or "plan" not in launch:
        raise LaunchError(f"launch file {path} must be a JSON object with 'spec' and 'plan'")
    try:
        spec = JobSpec.from_dict(launch["spec"])
    except SpecError as exc:
        raise LaunchError(f"bad job spec: {exc}") from exc
    try:
        plan = Plan.from_dict(launch["plan"])
    except PlanError as exc:
        raise LaunchError(f"bad plan: {exc}") from exc
    raw_rank = _env("TENAX_RANK")
    if not raw_rank.isdigit() or int(raw_rank) >= plan.world_size:
        raise LaunchError(f"TENAX_RANK={raw_rank!r} is not a rank of the plan's {plan.world_size} workers")
    rank = int(raw_rank)
    layout = ParallelLayout.from_plan(plan, micro_batch_size=spec.micro_batch_size)
    try:
        layout.validate(layers=spec.model.layers, global_batch_size=spec.global_batch_size)
    except ValueError as exc:
        raise LaunchError(f"plan layout does not fit the job: {exc}") from exc
    return spec, plan, rank, layout


def connect_store(address: str, prefix: str, timeout_s: float):
    import torch.distributed as dist

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"plan.store_address must be host:port, got {address!r}")
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - torch raises several types here
        raise RuntimeError(f"cannot reach the rendezvous store at {address} within {timeout_s:.0f}s: {exc}") from exc
    return dist.PrefixStore(prefix, store)


def run() -> int:
    spec, plan, rank, layout = load_launch()
    store_timeout = _float_env("TENAX_STORE_TIMEOUT_S", 30.0)
    collective_timeout = _float_env("TENAX_COLLECTIVE_TIMEOUT_S", 60.0)
    if os.environ.get("TENAX_ELASTIC", "1") == "0":
        return run_plain(spec, plan, rank, layout, store_timeout, collective_timeout)
    return run_elastic(spec, plan, rank, store_timeout, collective_timeout)


def run_elastic(spec, plan, rank: int, store_timeout: float, collective_timeout: float) -> int:
    """The default: survive failures in process (trainer/elastic.py has the state machine)."""
    from trainer.elastic import ElasticSettings, ElasticWorker, parse_faults
    from trainer.train import MetricsWriter, pick_device

    if not plan.store_address:
        raise LaunchError("plan.store_address is empty")
    settings = ElasticSettings(
        store_timeout_s=store_timeout, collective_timeout_s=collective_timeout,
        plan_wait_s=_float_env("TENAX_PLAN_WAIT_S", 60.0), transfer_timeout_s=collective_timeout,
        prepare_wait_s=_float_env("TENAX_PREPARE_WAIT_S", 300.0),
        snapshot_every=spec.elastic.snapshot_every, checkpoint_every=spec.elastic.checkpoint_every,
        run_dir=os.environ.get("TENAX_RUN_DIR", ""),
    )
    metrics = MetricsWriter(os.environ.get("TENAX_METRICS_FILE") or None)
    try:
        worker = ElasticWorker(
            spec, plan, rank, device=pick_device(spec), metrics=metrics, settings=settings,
            etcd=os.environ.get("TENAX_ETCD", ""), etcd_prefix=os.environ.get("TENAX_ETCD_PREFIX", "/tenax"),
            faults=parse_faults(os.environ.get("TENAX_FAULT", "")),
            growth_id=os.environ.get("TENAX_GROWTH_ID", ""),
        )
        return worker.run()
    finally:
        metrics.close()


def run_plain(spec, plan, rank, layout, store_timeout: float, collective_timeout: float) -> int:
    """TENAX_ELASTIC=0: one generation, no snapshots, a failure ends the worker (baseline for benchmarks)."""
    import torch.distributed as dist

    from trainer.train import MetricsWriter, Trainer, init_process_group, pick_device

    device = pick_device(spec)
    store = connect_store(plan.store_address, plan.store_prefix, store_timeout)
    init_process_group(store=store, rank=rank, world_size=plan.world_size, device=device, timeout_s=collective_timeout)
    metrics = MetricsWriter(os.environ.get("TENAX_METRICS_FILE") or None)
    try:
        trainer = Trainer(spec, layout, rank, device=device, generation=plan.generation, metrics=metrics)
        trainer.train(spec.steps)
        # Nobody tears down its connections while a peer may still be reading from them.
        dist.barrier()
    finally:
        metrics.close()
        dist.destroy_process_group()
    return 0


def main() -> int:
    rank = os.environ.get("TENAX_RANK", "?")
    try:
        return run()
    except LaunchError as exc:
        print(f"tenax worker rank {rank}: launch error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # where it was when interrupted: the log's last exception line (tenax logs, events)
        traceback.print_exc()
        sys.stderr.flush()
        return 130
    except Exception as exc:  # noqa: BLE001 - report any training failure clearly, then exit non-zero
        traceback.print_exc()
        print(f"tenax worker rank {rank}: training failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalisation: torch's communication threads can abort the
    # process in static destructors after a clean run, turning exit 0 into -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
