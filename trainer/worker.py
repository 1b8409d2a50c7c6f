"""``python -m trainer.worker``: one training rank, launched by an agent (or train-local).

Launch contract (protos/launch.py; parsed once, trainer/settings.py): TENAX_LAUNCH_FILE holds
{"spec": JobSpec dict, "plan": Plan dict}; TENAX_RANK is this worker's global
rank; TENAX_METRICS_FILE receives one JSON line per step; TENAX_RUN_DIR is the
per-job directory. The rendezvous store is the TCPStore at plan.store_address,
under plan.store_prefix. The plan (not spec.parallelism) is authoritative for
the layout, since the controller changes it as the world changes.

Elastic by default (trainer/elastic.py): with TENAX_PLAN_FILE set, the worker follows
the job's plan (its agent relays it from etcd into that file: workers hold no etcd
credentials) and survives failures of its peers in process; it exits 0
after the last step or when a new generation has no place for it. TENAX_FAULT
injects failures (tests). TENAX_ELASTIC=0 runs the plain single-generation
trainer; TENAX_SNAPSHOTS=0 keeps the elastic runtime without snapshots (both
for benchmarks). TENAX_PLAN_WAIT_S (default 60) bounds the wait for plan g+1.

Two-phase growth: the agent sets TENAX_GROWTH_ID for a worker it starts for a
growth being prepared (the launch plan is the tentative plan g+1). The worker gets
ready, writes a READY joiner record to TENAX_READY_FILE (its agent relays it to etcd),
and joins only once a plan >= g+1 in the plan file names its (node, slot); it exits 0 if none does within TENAX_PREPARE_WAIT_S
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

from common.spec import JobSpec, SpecError
from protos import launch
from protos.plan import Plan, PlanError
from trainer.parallel import ParallelLayout
from trainer.settings import ElasticSettings, WorkerSettings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


class LaunchError(Exception):
    """The launch environment, spec or plan is unusable (exit code 2)."""


def load_settings(env=None) -> WorkerSettings:
    """The launch environment (protos/launch.py); LaunchError naming the bad variable."""
    try:
        return WorkerSettings.from_env(env)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def load_launch(settings: WorkerSettings):
    """(spec, plan, rank, layout) from the launch file and rank; LaunchError if anything is off."""
    path = settings.launch_file
    if not path:
        raise LaunchError(f"environment variable {launch.LAUNCH_FILE} is not set")
    try:
        with open(path) as f:
            launched = json.load(f)
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read launch file {path}: {exc}") from exc
    if not isinstance(launched, dict) or "spec" not in launched or "plan" not in launched:
        raise LaunchError(f"launch file {path} must be a JSON object with 'spec' and 'plan'")
    try:
        spec = JobSpec.from_dict(launched["spec"])
    except SpecError as exc:
        raise LaunchError(f"bad job spec: {exc}") from exc
    try:
        plan = Plan.from_dict(launched["plan"])
    except PlanError as exc:
        raise LaunchError(f"bad plan: {exc}") from exc
    rank = settings.rank
    if rank is None:
        raise LaunchError(f"environment variable {launch.RANK} is not set")
    if rank >= plan.world_size:
        raise LaunchError(f"{launch.RANK}={str(rank)!r} is not a rank of the plan's {plan.world_size} workers")
    layout = ParallelLayout.from_plan(plan, micro_batch_size=spec.micro_batch_size)
    try:
        layout.validate(layers=spec.model.layers, global_batch_size=spec.global_batch_size)
    except ValueError as exc:
        raise LaunchError(f"plan layout does not fit the job: {exc}") from exc
    if spec.model.init_from:
        from trainer import hf  # imports torch: only a job that starts from published weights pays it here

        try:
            hf.check_checkpoint(spec.model, spec.model.init_from)
        except (hf.CheckpointError, OSError) as exc:
            raise LaunchError(str(exc)) from exc
    return spec, plan, rank, layout


def connect_store(address: str, prefix: str, timeout_s: float):
    import torch.distributed as dist  # past the launch checks only (see run_plain)

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LaunchError(f"plan.store_address must be host:port, got {address!r}")
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - torch raises several types here
        raise RuntimeError(f"cannot reach the rendezvous store at {address} within {timeout_s:.0f}s: {exc}") from exc
    return dist.PrefixStore(prefix, store)


def run() -> int:
    settings = load_settings()
    spec, plan, rank, layout = load_launch(settings)
    # Flight Recorder on before the first process group, dumps on the agent's request (trainer/flight.py)
    from trainer import flight
    try:
        flight.start(settings.run_dir, rank)
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    if not settings.elastic:
        return run_plain(spec, plan, rank, layout, settings)
    return run_elastic(spec, plan, rank, settings)


def run_elastic(spec, plan, rank: int, settings: WorkerSettings) -> int:
    """The default: survive failures in process (trainer/elastic.py has the state machine)."""
    # torch imports only past the launch checks: a bad launch fails fast (exit 2)
    from trainer.elastic import ElasticWorker
    from trainer.faults import parse_faults
    from trainer.train import MetricsWriter, pick_device

    if not plan.store_address:
        raise LaunchError("plan.store_address is empty")
    elastic = ElasticSettings.from_worker(settings, snapshot_every=spec.elastic.snapshot_every,
                                          checkpoint_every=spec.elastic.checkpoint_every,
                                          checkpoint_keep=spec.elastic.checkpoint_keep)
    metrics = MetricsWriter(settings.metrics_file or None)
    try:
        worker = ElasticWorker(
            spec, plan, rank, device=pick_device(spec), metrics=metrics, settings=elastic,
            plan_file=settings.plan_file, ready_file=settings.ready_file,
            faults=parse_faults(settings.faults), growth_id=settings.growth_id,
        )
        return worker.run()
    finally:
        metrics.close()


def run_plain(spec, plan, rank, layout, settings: WorkerSettings) -> int:
    """TENAX_ELASTIC=0: one generation, no snapshots, a failure ends the worker (baseline for benchmarks)."""
    # torch imports only past the launch checks: a bad launch fails fast (exit 2)
    import torch.distributed as dist

    from trainer.train import MetricsWriter, Trainer, init_process_group, pick_device

    device = pick_device(spec)
    store = connect_store(plan.store_address, plan.store_prefix, settings.store_timeout_s)
    init_process_group(store=store, rank=rank, world_size=plan.world_size, device=device,
                       timeout_s=settings.collective_timeout_s, backend=settings.backend)
    metrics = MetricsWriter(settings.metrics_file or None)
    try:
        trainer = Trainer(spec, layout, rank, device=device, generation=plan.generation, metrics=metrics,
                          settings=settings)
        trainer.train(spec.steps)
        # Nobody tears down its connections while a peer may still be reading from them.
        dist.barrier()
    finally:
        metrics.close()
        dist.destroy_process_group()
    return 0


def main() -> int:
    rank = os.environ.get(launch.RANK, "?")  # labels the messages, even when the environment does not parse
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
