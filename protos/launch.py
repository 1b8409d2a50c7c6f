"""The worker launch contract: every environment variable an agent (or ``tenax train-local``,
a test harness, a benchmark) sets for ``python -m trainer.worker``, named once here.

The writer is agent/supervisor.py; the one reader is ``trainer.settings.WorkerSettings.from_env``.
An empty value means the same as an unset one (the default). Numbers of seconds must be
finite and > 0; flags are ``0`` or ``1``. Anything else is a launch error (exit 2) naming
the variable. The launch file, the rendezvous store and the plan are described in
protos/plan.py; the elastic runtime's side of the contract in docs/elastic-worker.md.
"""

from __future__ import annotations

# ------------------------------------------------------------ set by the agent for every worker
JOB_ID = "TENAX_JOB_ID"
"""The job id (informative: the launch file's plan names the job too)."""

RANK = "TENAX_RANK"
"""This worker's global rank in the launch plan (a non-negative integer). Required."""

LAUNCH_FILE = "TENAX_LAUNCH_FILE"
"""Path of the JSON file ``{"spec": JobSpec.to_dict(), "plan": Plan.to_dict()}``. Required."""

METRICS_FILE = "TENAX_METRICS_FILE"
"""Path the worker appends its per-step JSON lines and recovery records to; unset: stdout."""

RUN_DIR = "TENAX_RUN_DIR"
"""Per-job directory on this host: disk checkpoints, the chaos slowdown file, ``killed-PID``
marks of injected faults. Unset: no disk checkpoints, no chaos control."""

CHECKPOINT_DIR = "TENAX_CHECKPOINT_DIR"
"""The job's disk-checkpoint directory. When every agent names one shared filesystem path (agent
``--checkpoint-dir``), any rank of a later layout, on any node, reads every rank's checkpoints.
Unset: ``<TENAX_RUN_DIR>/checkpoints`` on this host (a recovery reads its own node's only)."""

PLAN_FILE = "TENAX_PLAN_FILE"
"""Path of the job's plan file on this host (``Plan.to_json()``), which the agent replaces
atomically with every newer plan of the job it sees in etcd; the worker follows it
(trainer/plan_watch.py). Workers get no etcd access and no etcd credentials. Unset: not
elastic across generations (a failure ends the worker with exit 1)."""

NODE_ID = "TENAX_NODE_ID"
"""The agent's node id (informative: the launch plan's worker entry is authoritative)."""

GROWTH_ID = "TENAX_GROWTH_ID"
"""Set only for a worker of a growth being prepared (protos.records.GrowthRecord): the launch
file holds the tentative plan g+1; the worker gets ready, says so (``TENAX_READY_FILE``) and
joins only once a plan >= g+1 in the plan file names it. Needs ``TENAX_PLAN_FILE`` and
``TENAX_READY_FILE``."""

READY_FILE = "TENAX_READY_FILE"
"""Set with ``TENAX_GROWTH_ID``: where the prepared worker writes its READY record
(``JoinerRecord`` JSON, atomically); its agent relays it to etcd (Keys.job_joiner)."""

PER_WORKER = (JOB_ID, RANK, LAUNCH_FILE, METRICS_FILE, RUN_DIR, CHECKPOINT_DIR, PLAN_FILE, NODE_ID, GROWTH_ID,
              READY_FILE)
"""What the agent sets per worker (never inherited from its own environment); the rest of
the contract below may come from the agent's environment (e.g. ``TENAX_COMPILE``)."""

# ------------------------------------------------------------ timeouts (seconds)
STORE_TIMEOUT_S = "TENAX_STORE_TIMEOUT_S"
"""Seconds to reach the rendezvous store. Default 30."""

COLLECTIVE_TIMEOUT_S = "TENAX_COLLECTIVE_TIMEOUT_S"
"""Seconds: backstop of process-group init, one collective, one transfer and a generation's
rendezvous (aborts come much sooner). Default 60."""

PLAN_WAIT_S = "TENAX_PLAN_WAIT_S"
"""Seconds a worker waits for plan g+1 after it noticed a failure. Default 60."""

PREPARE_WAIT_S = "TENAX_PREPARE_WAIT_S"
"""Seconds a prepared growth worker waits for the plan that takes it in, then exits 0.
Default 300."""

HEARTBEAT_S = "TENAX_HEARTBEAT_S"
"""Seconds between heartbeat lines while a step runs. Default 1."""

FLIGHT_RECORDER_ENTRIES = "TENAX_FLIGHT_RECORDER_ENTRIES"
"""PyTorch Flight Recorder ring size (entries per process, an integer >= 0; 0 = off). Default
protos.flight.DEFAULT_BUFFER_ENTRIES. The worker passes it on as ``TORCH_FR_BUFFER_SIZE``
before its first process group (trainer/flight.py)."""

# ------------------------------------------------------------ switches (benchmarks, tests)
ELASTIC = "TENAX_ELASTIC"
"""``0``: the plain single-generation trainer (a failure ends the worker). Default ``1``."""

SNAPSHOTS = "TENAX_SNAPSHOTS"
"""``0``: the elastic runtime without snapshots and replication (their overhead). Default ``1``."""

TELEMETRY = "TENAX_TELEMETRY"
"""``0``: no phase times, heartbeats or chaos slowdown in the step lines. Default ``1``."""

COMPILE = "TENAX_COMPILE"
"""torch.compile the blocks: ``auto`` (default: on CUDA only), ``1`` always, ``0`` never."""

BACKEND = "TENAX_BACKEND"
"""Force the collective backend, ``gloo`` or ``nccl``. Default: NCCL on CUDA, gloo on CPU
(``gloo`` with CUDA tensors runs several ranks on one GPU)."""

P2P_STAGING = "TENAX_P2P_STAGING"
"""Stage the pipeline's point-to-point sends through (pinned) host buffers: ``auto`` (default:
when the backend is gloo and the tensors live on CUDA: gloo has no CUDA send/recv), ``1``
always (CPU tests exercise the same path), ``0`` never."""

SNAPSHOT_BUFFERS = "TENAX_SNAPSHOT_BUFFERS"
"""Host buffer sets for a worker's own snapshots, ``2`` or ``3`` (default ``3``: the third keeps
the step its buddy holds while two alternate). ``2`` caps host memory at two copies of the
rank's state for its own snapshots (plus two for the replica it keeps); a boundary whose
only free buffer holds that step is then skipped (fewer snapshots, never a wait)."""

FAULT = "TENAX_FAULT"
"""Fault injection (test infrastructure): ``;``-separated faults such as
``rank=3,step=4,kind=kill,when=mid`` (grammar: trainer/faults.py). Default: none."""

ALL = (JOB_ID, RANK, LAUNCH_FILE, METRICS_FILE, RUN_DIR, CHECKPOINT_DIR, PLAN_FILE, NODE_ID, GROWTH_ID, READY_FILE,
       STORE_TIMEOUT_S, COLLECTIVE_TIMEOUT_S, PLAN_WAIT_S, PREPARE_WAIT_S,
       HEARTBEAT_S, ELASTIC, SNAPSHOTS, TELEMETRY, COMPILE, BACKEND, P2P_STAGING, SNAPSHOT_BUFFERS,
       FAULT, FLIGHT_RECORDER_ENTRIES)
"""Every name of the contract."""
