"""The worker's settings: the launch environment (protos/launch.py) parsed in one place.

``WorkerSettings.from_env`` is the only reader of the launch contract's variables in the
trainer; every bad value is a ValueError naming the variable (the worker turns it into a
launch error, exit 2). ``ElasticSettings`` is the elastic runtime's view of them plus the
job spec's snapshot and checkpoint intervals. Torch-free: the launch-error path stays fast.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from protos import launch


def _text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name) or default


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A finite number of seconds > 0; empty or unset: ``default``."""
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name, "")
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    return _choice(env, name, ("0", "1"), "1" if default else "0") == "1"


def _rank(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "")
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r} is not a rank (a non-negative integer)")
    return int(raw)


@dataclass(kw_only=True)
class WorkerSettings:
    """One worker's launch environment (each field: the variable of protos/launch.py named in it)."""

    job_id: str = ""
    """``TENAX_JOB_ID`` (informative)."""
    rank: int | None = None
    """``TENAX_RANK``: global rank in the launch plan; None: not set."""
    launch_file: str = ""
    """``TENAX_LAUNCH_FILE``: path of the launch file; '' = not set."""
    metrics_file: str = ""
    """``TENAX_METRICS_FILE``: per-step JSON lines; '' = stdout."""
    run_dir: str = ""
    """``TENAX_RUN_DIR``: per-job directory; '' = no disk checkpoints, no chaos control."""
    checkpoint_dir: str = ""
    """``TENAX_CHECKPOINT_DIR``: the job's disk checkpoints; '' = ``<run_dir>/checkpoints``."""
    plan_file: str = ""
    """``TENAX_PLAN_FILE``: the job's plan file, kept current by the agent; '' = no plan following."""
    ready_file: str = ""
    """``TENAX_READY_FILE``: where a growth worker says READY; '' = not set."""
    node_id: str = ""
    """``TENAX_NODE_ID`` (informative: the launch plan is authoritative)."""
    growth_id: str = ""
    """``TENAX_GROWTH_ID``: set for a worker of a growth being prepared."""
    faults: str = ""
    """``TENAX_FAULT``: fault injection, unparsed (grammar: trainer.faults.parse_faults)."""
    store_timeout_s: float = 30.0
    """``TENAX_STORE_TIMEOUT_S``: seconds to reach the rendezvous store."""
    collective_timeout_s: float = 60.0
    """``TENAX_COLLECTIVE_TIMEOUT_S``: backstop of init, collectives and transfers (seconds)."""
    plan_wait_s: float = 60.0
    """``TENAX_PLAN_WAIT_S``: seconds to wait for plan g+1 after a failure."""
    prepare_wait_s: float = 300.0
    """``TENAX_PREPARE_WAIT_S``: seconds a prepared growth worker waits for its plan."""
    heartbeat_s: float = 1.0
    """``TENAX_HEARTBEAT_S``: seconds between heartbeat lines while a step runs."""
    elastic: bool = True
    """``TENAX_ELASTIC``: False runs the plain single-generation trainer."""
    snapshots: bool = True
    """``TENAX_SNAPSHOTS``: False keeps the elastic runtime without snapshots and replication."""
    telemetry: bool = True
    """``TENAX_TELEMETRY``: False turns phase times, heartbeats and the chaos slowdown off."""
    compile: str = "auto"
    """``TENAX_COMPILE``: ``auto`` (CUDA only), ``1`` or ``0``."""
    backend: str = ""
    """``TENAX_BACKEND``: ``gloo`` or ``nccl``; '' = by device."""
    p2p_staging: str = "auto"
    """``TENAX_P2P_STAGING``: ``auto`` (gloo with CUDA tensors), ``1`` or ``0``."""
    snapshot_buffers: int = 3
    """``TENAX_SNAPSHOT_BUFFERS``: host buffer sets of the own snapshots (copies of the state), 2 or 3."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        """Parse ``env`` (default: this process's environment); ValueError naming the variable."""
        env = os.environ if env is None else env
        return cls(
            job_id=_text(env, launch.JOB_ID), rank=_rank(env, launch.RANK),
            launch_file=_text(env, launch.LAUNCH_FILE), metrics_file=_text(env, launch.METRICS_FILE),
            run_dir=_text(env, launch.RUN_DIR), checkpoint_dir=_text(env, launch.CHECKPOINT_DIR),
            plan_file=_text(env, launch.PLAN_FILE),
            ready_file=_text(env, launch.READY_FILE),
            node_id=_text(env, launch.NODE_ID), growth_id=_text(env, launch.GROWTH_ID),
            faults=_text(env, launch.FAULT),
            store_timeout_s=_seconds(env, launch.STORE_TIMEOUT_S, 30.0),
            collective_timeout_s=_seconds(env, launch.COLLECTIVE_TIMEOUT_S, 60.0),
            plan_wait_s=_seconds(env, launch.PLAN_WAIT_S, 60.0),
            prepare_wait_s=_seconds(env, launch.PREPARE_WAIT_S, 300.0),
            heartbeat_s=_seconds(env, launch.HEARTBEAT_S, 1.0),
            elastic=_flag(env, launch.ELASTIC, True), snapshots=_flag(env, launch.SNAPSHOTS, True),
            telemetry=_flag(env, launch.TELEMETRY, True),
            compile=_choice(env, launch.COMPILE, ("auto", "0", "1"), "auto"),
            backend=_choice(env, launch.BACKEND, ("gloo", "nccl"), ""),
            p2p_staging=_choice(env, launch.P2P_STAGING, ("auto", "0", "1"), "auto"),
            snapshot_buffers=int(_choice(env, launch.SNAPSHOT_BUFFERS, ("2", "3"), "3")),
        )


@dataclass(kw_only=True)
class ElasticSettings:
    """The elastic runtime's settings (trainer/elastic.py), from the launch environment and the job spec."""

    store_timeout_s: float = 30.0
    """Seconds to reach a generation's rendezvous store."""
    collective_timeout_s: float = 60.0
    """Backstop for one wait and the rendezvous of a generation (aborts come much sooner), seconds."""
    plan_wait_s: float = 60.0
    """Longest a worker waits for plan g+1 after it noticed a failure (seconds)."""
    transfer_timeout_s: float = 60.0
    """Backstop of one transfer of state between ranks (seconds)."""
    prepare_wait_s: float = 300.0
    """A worker prepared for a growth waits this long (seconds) for the plan that takes it in, then exits 0."""
    gpu_release_wait_s: float = 60.0
    """Longest a recovering rank waits (seconds) for the GPU memory of a process still exiting on its
    device (trainer/gpu_release.py) before it allocates anyway."""
    snapshot_every: str = "auto"
    """Snapshot interval in steps, or ``auto`` (the job spec's ``elastic.snapshot_every``)."""
    checkpoint_every: int = 0
    """Disk checkpoint interval in steps; 0 = none (the job spec's ``elastic.checkpoint_every``)."""
    checkpoint_keep: int = 3
    """Disk checkpoints this worker keeps, newest first (the job spec's ``elastic.checkpoint_keep``)."""
    run_dir: str = ""
    """Per-job directory (disk checkpoints, fault marks); '' = none."""
    checkpoint_dir: str = ""
    """The job's disk checkpoints (shared by the nodes when the agents say so); '' = ``<run_dir>/checkpoints``."""
    snapshots: bool = True
    """False turns snapshots and replication off (benchmarks: their overhead)."""
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    """The whole launch environment (backend, compile, telemetry), handed to every Trainer."""

    @property
    def checkpoint_root(self) -> str:
        """Where disk checkpoints go: ``checkpoint_dir``, else ``<run_dir>/checkpoints``; '' = nowhere."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return os.path.join(self.run_dir, "checkpoints") if self.run_dir else ""

    @classmethod
    def from_worker(cls, worker: WorkerSettings, *, snapshot_every: str, checkpoint_every: int,
                    checkpoint_keep: int = 3) -> "ElasticSettings":
        return cls(store_timeout_s=worker.store_timeout_s, collective_timeout_s=worker.collective_timeout_s,
                   plan_wait_s=worker.plan_wait_s, transfer_timeout_s=worker.collective_timeout_s,
                   prepare_wait_s=worker.prepare_wait_s, snapshot_every=snapshot_every,
                   checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep, run_dir=worker.run_dir,
                   checkpoint_dir=worker.checkpoint_dir, snapshots=worker.snapshots,
                   worker=worker)
