"""The JSON records stored in etcd (other than the Plan, see protos/plan.py).

One module spells every shape, so the controller (reader) and the agent
(writer) agree. Every record is a small frozen dataclass with ``to_json`` and
``from_json``; ``from_json`` raises ``RecordError`` (a ValueError) on garbage,
so a reader can log and skip a malformed etcd value instead of crashing.

Unknown keys are ignored by readers (forward compatibility); missing optional
keys take their defaults; missing required keys or values of the wrong type
are errors. Times are unix seconds (float).

Key -> record (see protos/keys.py):

    Keys.leader()                     LeaderRecord        (controller, under its lease)
    Keys.node(node)                   NodeRecord          (agent, under its lease)
    Keys.node_health(node)            NodeHealthRecord    (agent, under its lease)
    Keys.node_registry(node)          RegistryRecord      (controller leader; persistent)
    Keys.cordon(node)                 CordonRecord        (controller, any replica)
    Keys.job_spec(job)                common.spec.JobSpec.to_dict() as JSON
    Keys.job_status(job)              JobStatusRecord     (controller)
    Keys.job_plan(job)                protos.plan.Plan
    Keys.job_cancel(job)              CancelRecord        (controller, any replica)
    Keys.job_worker(job, rank)        WorkerStatusRecord  (agent)
    Keys.job_progress_rank(job, rank) ProgressRecord      (agent, throttled)
    Keys.job_metrics_batch(job, s)    MetricsBatch        (agent, rank 0's step records from step s)
    Keys.job_event(job, seq)          JobEventRecord      (controller / elastic recovery)
    Keys.job_growth(job)              GrowthRecord        (controller: a two-phase growth)
    Keys.job_joiner(job, node, slot)  JoinerRecord        (the joining worker: READY; its agent: an early exit)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

JOB_PHASES = ("PENDING", "RUNNING", "RECOVERING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_PHASES = ("SUCCEEDED", "FAILED", "CANCELLED")
WORKER_STATES = ("STARTING", "RUNNING", "EXITED", "FAILED", "KILLED")
WORKER_DONE_STATES = ("EXITED", "FAILED", "KILLED")
NODE_CONDITIONS = ("HEALTHY", "DEGRADED", "FAILED")
GROWTH_STATES = ("PREPARING", "COMMITTED", "ABANDONED")
JOINER_STATES = ("READY", "EXITED", "FAILED", "KILLED")

_MISSING = dataclasses.MISSING


class RecordError(ValueError):
    """An etcd value does not hold the expected record (garbage, wrong types)."""


# ------------------------------------------------------------------ helpers
def _load(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise RecordError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _convert(value: Any, kind: type, what: str) -> Any:
    """Check/convert one JSON value to a simple field type (no silent coercion of junk)."""
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{what} must be a number, got {value!r:.80}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise RecordError(f"{what} must be an integer, got {value!r:.80}")
        return int(value)
    if kind is str:
        if not isinstance(value, str):
            raise RecordError(f"{what} must be a string, got {value!r:.80}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{what} must be true or false, got {value!r:.80}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{what} must be an object, got {value!r:.80}")
        return value
    if kind is list:
        if not isinstance(value, list):
            raise RecordError(f"{what} must be a list, got {value!r:.80}")
        return value
    raise TypeError(f"unsupported record field type {kind}")  # programming error


_KINDS = {"float": float, "int": int, "str": str, "bool": bool, "dict": dict, "list": list, "dict[str, Any]": dict,
          "dict[str, str]": dict, "list[dict[str, Any]]": list, "list[int]": list, "list[str]": list,
          "float | None": float, "int | None": int}


def _from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data or (data[f.name] is None and str(f.type).endswith("| None")):
            if f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
                raise RecordError(f"{what}.{f.name} is missing")
            continue
        kwargs[f.name] = _convert(data[f.name], _KINDS[str(f.type)], f"{what}.{f.name}")
    try:
        record = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{what} is malformed: {exc}") from exc
    check = getattr(record, "check", None)
    if check:
        check()
    return record


class _Record:
    """Mixin: JSON I/O for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise RecordError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        return _from_dict(cls, data, cls.__name__)

    @classmethod
    def from_json(cls: type[T], raw: str | bytes) -> T:
        return _from_dict(cls, _load(raw, cls.__name__), cls.__name__)  # type: ignore[arg-type]


# ------------------------------------------------------------------ cluster
@dataclass(kw_only=True, frozen=True)
class LeaderRecord(_Record):
    id: str
    """Controller replica id."""
    address: str
    """host:port of the leader's gRPC endpoint."""
    since: float = 0.0
    """Unix seconds when this replica became leader."""


@dataclass(kw_only=True, frozen=True)
class NodeRecord(_Record):
    """What an agent registers at Keys.node(id) under its lease (mirrors proto NodeInfo)."""

    id: str
    slots: int
    """Worker slots: GPUs found through NVML, or --slots on CPU."""
    hostname: str = ""
    address: str = ""
    """host:port of the agent's HTTP endpoint (/metrics, /logs/<job>/<rank>?offset=N)."""
    store_address: str = ""
    """host:port of the agent's rendezvous TCPStore."""
    labels: dict[str, str] = field(default_factory=dict)
    condition: str = "HEALTHY"
    """HEALTHY | DEGRADED | FAILED, decided by the agent from its telemetry."""
    condition_reason: str = ""
    started: float = 0.0
    """Unix seconds when the agent registered."""
    slot_devices: list[str] = field(default_factory=list)
    """Slot i -> the CUDA_VISIBLE_DEVICES its workers get ("" = no GPU); [] = slot i is GPU i
    (agents from before the slot map)."""

    def check(self) -> None:
        if not self.id or "/" in self.id:
            raise RecordError(f"NodeRecord.id must be a non-empty name without '/', got {self.id!r}")
        if self.slots < 0:
            raise RecordError(f"NodeRecord.slots must be >= 0, got {self.slots}")
        if self.condition not in NODE_CONDITIONS:
            raise RecordError(f"NodeRecord.condition must be one of {NODE_CONDITIONS}, got {self.condition!r}")


@dataclass(kw_only=True, frozen=True)
class NodeHealthRecord(_Record):
    """Latest node telemetry at Keys.node_health(id); ``gpus`` items mirror proto GpuHealth."""

    time: float
    cpu_percent: float = 0.0
    memory_used: int = 0
    """Bytes."""
    memory_total: int = 0
    """Bytes."""
    gpus: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True, frozen=True)
class RegistryRecord(_Record):
    """The controller's persistent memory of a node (survives the agent's lease).

    Lets a vanished node be listed as NOT_READY instead of disappearing.
    """

    node: dict[str, Any]
    """The last NodeRecord the agent registered (as a dict)."""
    first_seen: float = 0.0
    lost_at: float | None = None
    """Unix seconds when the controller saw the node's lease expire; None while registered."""


@dataclass(kw_only=True, frozen=True)
class CordonRecord(_Record):
    time: float
    reason: str = "cordon"
    """``cordon`` or ``drain``."""


# ------------------------------------------------------------------ jobs
@dataclass(kw_only=True, frozen=True)
class JobStatusRecord(_Record):
    """What the controller stores at Keys.job_status(job). Step/loss/workers are
    not stored here: they are folded from the progress and worker keys on read."""

    phase: str
    message: str = ""
    created: float = 0.0
    updated: float = 0.0
    generation: int = 0
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    """Items mirror proto Recovery (cause, generation, at_step, detection_s, ..., time)."""
    recoverable_step: int = 0

    def check(self) -> None:
        if self.phase not in JOB_PHASES:
            raise RecordError(f"JobStatusRecord.phase must be one of {JOB_PHASES}, got {self.phase!r}")


@dataclass(kw_only=True, frozen=True)
class CancelRecord(_Record):
    time: float
    reason: str = "cancelled by user"


@dataclass(kw_only=True, frozen=True)
class WorkerStatusRecord(_Record):
    """What an agent writes at Keys.job_worker(job, rank) on every state change."""

    rank: int
    node: str
    state: str
    """STARTING | RUNNING | EXITED | FAILED | KILLED (EXITED means exit code 0)."""
    slot: int = 0
    pid: int = 0
    exit_code: int | None = None
    signal: str = ""
    """Signal name (e.g. SIGKILL) when the worker died of a signal."""
    generation: int = 0
    """Plan generation the worker was started for (0: unknown)."""
    time: float = 0.0
    cause: str = ""
    """Why the agent killed it, when something else was wrong first (the root cause, e.g.
    ``hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP; killed``); "" otherwise."""
    last_error: str = ""
    """A failed worker: the last exception line of its log ("" if none)."""
    permanent: bool = False
    """The failure would repeat on any slot (``cause``: the host memory limit): the controller
    fails the job instead of re-planning it."""

    def check(self) -> None:
        if self.state not in WORKER_STATES:
            raise RecordError(f"WorkerStatusRecord.state must be one of {WORKER_STATES}, got {self.state!r}")

    @property
    def succeeded(self) -> bool:
        return self.state == "EXITED" and (self.exit_code or 0) == 0

    @property
    def failed(self) -> bool:
        return self.state in ("FAILED", "KILLED") or (self.state == "EXITED" and (self.exit_code or 0) != 0)


@dataclass(kw_only=True, frozen=True)
class ProgressRecord(_Record):
    """A rank's latest progress at Keys.job_progress_rank(job, rank) (the agent throttles it)."""

    step: int
    """Last completed (committed) step."""
    time: float
    loss: float | None = None
    """Loss at ``step``; None on ranks that do not compute it (non-last pipeline stages)."""
    tokens_per_s: float = 0.0
    """The job's training throughput (all ranks together) as measured by this rank."""
    generation: int = 0
    step_time_s: float = 0.0
    """Wall time of the last step."""
    recoverable_step: int = 0
    """Latest step whose snapshot is complete."""


@dataclass(kw_only=True, frozen=True)
class StepRecord(_Record):
    """One line of a job's per-step metrics (`tenax job ID --metrics`)."""

    step: int
    loss: float
    generation: int = 0
    time: float = 0.0
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    eval_loss: float | None = None
    """Held-out loss at this step (``data.eval_path``, every ``data.eval_every`` steps); None between evaluations."""
    eval_perplexity: float | None = None


@dataclass(kw_only=True, frozen=True)
class MetricsBatch:
    """A batch of StepRecords at Keys.job_metrics_batch(job, first_step): ``{"steps": [...]}``."""

    steps: tuple[StepRecord, ...]

    def to_json(self) -> str:
        return json.dumps({"steps": [s.to_dict() for s in self.steps]}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "MetricsBatch":
        data = _load(raw, "MetricsBatch")
        items = data.get("steps")
        if not isinstance(items, list):
            raise RecordError("MetricsBatch.steps must be a list")
        return cls(steps=tuple(StepRecord.from_dict(item) for item in items))


@dataclass(kw_only=True, frozen=True)
class JobEventRecord(_Record):
    """One entry of a job's timeline at Keys.job_event(job, seq) or Keys.job_event_at(...)
    (common/events.py writes them; kinds in common.events.EVENT_KINDS)."""

    kind: str
    """``hang``, ``straggler``, ``node-lost``, ``xid``, ``worker-exit``, ``plan``, ``recovery``
    (data mirrors proto Recovery), ``growth``, ``drain``, ``phase`` or ``note``."""
    time: float
    data: dict[str, Any] = field(default_factory=dict)
    """The evidence (scores, timeouts, signal seen, exit code, last exception line ...)."""
    message: str = ""
    """One line: what happened and why ("" on older records: common.events.describe renders one)."""
    step: int = 0
    """The job's step when it happened (0: unknown)."""
    action: str = ""
    """What was done about it ("" = nothing)."""


@dataclass(kw_only=True, frozen=True)
class GrowthRecord(_Record):
    """A two-phase growth of a job at Keys.job_growth(job) (controller/recovery.py).

    PREPARING: the agents named in ``joiners`` start a worker for each, launched with
    the tentative plan ``plan`` (generation base+1, ``switch_at_step`` -1) and
    ``TENAX_GROWTH_ID=id``; the workers get ready (imports, model, store) and write a
    READY JoinerRecord. The running job does not see any of this. COMMITTED: every
    joiner was ready; the controller wrote ``plan`` as plan base+1 with a switch step
    (same transaction). ABANDONED: a joiner exited, its node went away, ``deadline``
    passed, or the plan changed under it; agents stop the joiners, and no new attempt
    starts before ``retry_after``.
    """

    id: str
    base_generation: int
    """The plan generation the growth extends; a plan change makes the growth stale."""
    plan: dict[str, Any]
    """The tentative plan base+1 (protos.plan.Plan as a dict)."""
    joiners: list[dict[str, Any]]
    """``{"node", "slot", "rank"}`` of every new worker (slots the base plan does not use)."""
    state: str = "PREPARING"
    started: float = 0.0
    deadline: float = 0.0
    """Unix seconds after which a growth still PREPARING is abandoned."""
    attempt: int = 1
    """1 for the first try on this base generation, +1 for each retry."""
    ended: float = 0.0
    """When it was committed or abandoned."""
    reason: str = ""
    retry_after: float = 0.0
    """ABANDONED: no new growth of the job before this time."""

    def check(self) -> None:
        if self.state not in GROWTH_STATES:
            raise RecordError(f"GrowthRecord.state must be one of {GROWTH_STATES}, got {self.state!r}")
        for j in self.joiners:
            if not (isinstance(j, dict) and isinstance(j.get("node"), str) and isinstance(j.get("slot"), int)
                    and isinstance(j.get("rank"), int)):
                raise RecordError(f"GrowthRecord.joiners items must be {{node, slot, rank}}, got {j!r:.80}")

    def joiner_slots(self) -> list[tuple[str, int]]:
        return [(str(j["node"]), int(j["slot"])) for j in self.joiners]


@dataclass(kw_only=True, frozen=True)
class JoinerRecord(_Record):
    """A worker started for a growth, at Keys.job_joiner(job, node, slot).

    The worker writes READY once prepared; its agent writes EXITED/FAILED/KILLED if it
    ends before the growth is committed. Records of another growth id are stale."""

    growth_id: str
    node: str
    slot: int
    state: str
    pid: int = 0
    time: float = 0.0
    prepare_s: float = 0.0
    """READY: process start -> ready (imports, model build, store reachable)."""
    reason: str = ""

    def check(self) -> None:
        if self.state not in JOINER_STATES:
            raise RecordError(f"JoinerRecord.state must be one of {JOINER_STATES}, got {self.state!r}")


def parse_or_none(cls: type[T], raw: str | bytes, log: Any = None, where: str = "") -> T | None:
    """from_json, but log (warning) and return None on a malformed value."""
    try:
        return cls.from_json(raw)  # type: ignore[attr-defined]
    except ValueError as exc:
        if log is not None:
            log.warning("skipping malformed value at %s: %s", where or cls.__name__, exc)
        return None
