"""Pure decision functions of the controller: ``(state, now) -> (decision, reason)``.

Nothing here touches etcd, gRPC or the clock: the server gathers the state,
calls these, and writes what they decide. That keeps every rule testable as a
plain function call (tests/controller/test_controller_decisions.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.layout import new_plan, partition_for_spec
from common.spec import JobSpec
from protos.plan import Plan
from controller.recovery_decisions import all_ranks_on_generation, find_failure, plan_records, training_finished
from controller.quarantine import AUTO_CORDON_REASON
from protos.records import TERMINAL_PHASES, ProgressRecord, WorkerStatusRecord


# ------------------------------------------------------------------ nodes
@dataclass(kw_only=True, frozen=True)
class NodeView:
    """What the scheduler needs to know about one node."""

    id: str
    slots: int
    ready: bool
    """The agent holds its lease (its NodeInfo key exists)."""
    cordoned: bool = False
    used_slots: frozenset[int] = frozenset()
    """Slots taken by the current plans of active jobs."""
    store_address: str = ""

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.used_slots]

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned


def node_state(*, registered: bool, cordon_reason: str | None) -> tuple[str, str]:
    """A node's state: NOT_READY if its lease is gone (wins: nothing runs there),
    else CORDONED if cordoned or draining, else READY."""
    if not registered:
        return "NOT_READY", "agent lease expired (no NodeInfo key)"
    if cordon_reason is not None:
        if cordon_reason.startswith(AUTO_CORDON_REASON + ":"):
            return "CORDONED", cordon_reason  # by the controller: the reason says why
        return "CORDONED", f"{cordon_reason} by operator"
    return "READY", "agent registered"


# ------------------------------------------------------------------ scheduling
@dataclass(kw_only=True, frozen=True)
class Slot:
    node: str
    slot: int


def schedule(spec: JobSpec, nodes: list[NodeView]) -> tuple[list[Slot] | None, str]:
    """Pick one slot per rank (index = rank) or say why the job must wait.

    Packs by node: nodes with the most free slots first, so a job (and each of
    its pipelines, whose stages are consecutive ranks) spans as few nodes as
    possible. If one node alone can hold the job, the smallest such node is
    used, to keep big nodes free for big jobs.
    """
    world = spec.parallelism.dp * spec.parallelism.pp
    candidates = [n for n in nodes if n.schedulable and n.free_slots]
    free_total = sum(len(n.free_slots) for n in candidates)
    if free_total < world:
        return None, (f"waiting for {world} free slots; {free_total} free on {len(candidates)} "
                      f"ready, uncordoned node(s)")
    fitting = sorted((n for n in candidates if len(n.free_slots) >= world), key=lambda n: (len(n.free_slots), n.id))
    if fitting:
        order = [fitting[0]]
    else:
        order = sorted(candidates, key=lambda n: (-len(n.free_slots), n.id))
    placement: list[Slot] = []
    for node in order:
        for slot in node.free_slots:
            if len(placement) == world:
                break
            placement.append(Slot(node=node.id, slot=slot))
    nodes_used = len({s.node for s in placement})
    return placement, f"placed {world} worker(s) on {nodes_used} node(s)"


def build_plan(*, job_id: str, spec: JobSpec, placement: list[Slot], store_address: str,
               generation: int = 1, reason: str = "submit") -> Plan:
    """The plan for ``placement`` (index = rank, dp-major: rank = dp_rank*pp + pp_rank)."""
    pp = spec.parallelism.pp
    return new_plan(job_id=job_id, generation=generation, placement=[(s.node, s.slot) for s in placement],
                    dp=spec.parallelism.dp, pp=pp, zero_stage=spec.parallelism.zero_stage,
                    layer_partition=partition_for_spec(spec.model, pp), global_batch_size=spec.global_batch_size,
                    store_address=store_address, reason=reason)


# ------------------------------------------------------------------ job phase
@dataclass(kw_only=True, frozen=True)
class JobState:
    """Everything the phase decision looks at (gathered from etcd by the server)."""

    phase: str
    """The phase stored now."""
    cancelled: bool = False
    plan: Plan | None = None
    workers: dict[int, WorkerStatusRecord] = field(default_factory=dict)
    live_nodes: frozenset[str] = frozenset()
    progress: dict[int, ProgressRecord] = field(default_factory=dict)
    """Latest progress per rank (a rank is on a generation once it did a step there)."""


def on_worker_failure(state: JobState, failed: list[str]) -> tuple[str, str]:
    """What a failed worker or lost node does to a job: it needs plan g+1 (RECOVERING).
    controller/recovery.py writes that plan (or FAILED when none is possible) before this
    rule is consulted; the phase here only says what the job is waiting for."""
    return "RECOVERING", "needs a new plan: " + "; ".join(failed)


def job_phase(state: JobState, now: float) -> tuple[str, str]:
    """The phase a job should be in now, and why."""
    del now  # time-based rules (hang detection) come with elastic recovery
    if state.phase in TERMINAL_PHASES:
        return state.phase, "terminal"
    if state.cancelled:
        return "CANCELLED", "cancelled by user"
    plan = state.plan
    if plan is None:
        return "PENDING", "waiting to be scheduled"
    # workers are identified by (node, slot): ranks are renumbered when the layout changes
    current = plan_records(plan, state.workers)
    failure = find_failure(plan, state.workers, state.live_nodes)
    if failure is not None:
        return on_worker_failure(state, failure.description.split("; "))
    if len(current) == plan.world_size and all(w.succeeded for w in current.values()):
        return "SUCCEEDED", f"all {plan.world_size} workers exited 0"
    if training_finished(plan, state.workers):
        return finished_phase(plan, current, state.live_nodes)
    if state.phase == "RECOVERING" and not all_ranks_on_generation(plan, state.progress, state.workers):
        # whoever wrote plan g+1 set RECOVERING; it ends when every rank did a step at generation g+1
        return "RECOVERING", f"waiting for all ranks to run plan generation {plan.generation}"
    return "RUNNING", f"plan generation {plan.generation} with {plan.world_size} workers"


def finished_phase(plan: Plan, current: Mapping[int, WorkerStatusRecord],
                   live_nodes: frozenset[str]) -> tuple[str, str]:
    """The training is done (``training_finished``): SUCCEEDED once no rank is still exiting.
    A rank whose node was lost, or that failed after the final barrier, is reported, not
    waited for: every step was trained."""
    def ended(rank: int) -> bool:
        return rank in current and (current[rank].succeeded or current[rank].failed)

    exiting = [a.rank for a in plan.workers if a.node in live_nodes and not ended(a.rank)]
    if exiting:
        return "RUNNING", f"training finished; waiting for rank(s) {exiting} to exit"
    after = [f"rank {a.rank} on {a.node}: node lost" if a.node not in live_nodes else
             f"rank {a.rank} on {a.node}: {current[a.rank].state.lower()} (exit code {current[a.rank].exit_code})"
             for a in plan.workers if not (a.rank in current and current[a.rank].succeeded)]
    return "SUCCEEDED", "training finished; after the final step: " + "; ".join(after)


# ------------------------------------------------------------------ progress
@dataclass(kw_only=True, frozen=True)
class Progress:
    step: int = 0
    loss: float | None = None
    tokens_per_s: float = 0.0
    eta_s: float = 0.0
    recoverable_step: int = 0
    time: float = 0.0
    generation: int = 0


def fold_progress(spec: JobSpec, ranks: dict[int, ProgressRecord]) -> Progress:
    """The job's progress from its ranks' latest records: the furthest step, the
    loss at it (only ranks that compute the loss report one), the throughput and
    an ETA from tokens per step."""
    if not ranks:
        return Progress()
    latest = max(ranks.values(), key=lambda p: (p.step, p.time))
    step = latest.step
    with_loss = [p for p in ranks.values() if p.loss is not None and math.isfinite(p.loss)]
    loss = max(with_loss, key=lambda p: (p.step, p.time)).loss if with_loss else None
    at_step = [p for p in ranks.values() if p.step == step]
    tokens_per_s = max(p.tokens_per_s for p in at_step)
    remaining = max(spec.steps - step, 0)
    step_time = max((p.step_time_s for p in at_step), default=0.0)
    if tokens_per_s > 0:
        eta = remaining * spec.global_batch_size * spec.model.seq_len / tokens_per_s
    else:
        eta = remaining * step_time
    return Progress(step=step, loss=loss, tokens_per_s=tokens_per_s, eta_s=eta,
                    recoverable_step=min(p.recoverable_step for p in ranks.values()),
                    time=latest.time, generation=latest.generation)
