"""Pure decisions of elastic recovery: ``(state, now) -> (decision, reason)``.

No etcd, no clock, no processes: ``controller/recovery.py`` gathers the state
from the mirror, calls these, and writes what they decide (tests:
tests/controller/test_recovery_decisions.py).

Identity across generations. Ranks are renumbered when the layout changes, so a
worker is identified by where it runs, ``(node, slot)``, not by its rank. The
agent writes a worker's status under the key of its *current* rank; after a
re-plan, a record found under some rank key may belong to a worker of an older
generation. ``plan_records`` pairs each assignment of the current plan with the
newest record of its (node, slot) that is relevant to that plan.

Recovery records. Every plan change (failure, growth, drain, rebalance) appends
one entry to ``JobStatusRecord.recoveries`` when the plan is written
(``pending_recovery``), with the control side's times (detection, plan). When
every rank of the new generation has reported a step at that generation, the
entry is completed (``complete_recovery``) from the workers' own recovery
records (protos/recovery.py, relayed by the agent inside the rank's progress
record under ``"recovery"``) and the time of the first step done at the new
generation (``"generation_first_step_time"``). Entries mirror proto Recovery;
the extra keys (``failed_at``, ``seen_at``, ``planned_at``, ``complete``,
``reason``) are ignored by the proto conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from common.comm_errors import most_telling
from common.layout import new_plan, ranks_replicated_on_their_node
from protos.plan import Plan
from common.spec import JobSpec
from protos.records import GrowthRecord, JoinerRecord, ProgressRecord, WorkerStatusRecord

GROWTH_MARGIN_S = 1.5
"""Growth and drain switch this many seconds of steps ahead (at least MIN_MARGIN_STEPS), so
every survivor has read the plan before the boundary and a new worker has time to start."""
MIN_MARGIN_STEPS = 3
MAX_MARGIN_STEPS = 50

GROWTH_PREPARE_TIMEOUT_S = 120.0
"""Longest a two-phase growth waits for its new workers to be ready (process start, imports,
model build, CUDA init on a GPU host) before it is abandoned."""
GROWTH_RETRY_S = 30.0
"""After an abandoned growth, the next attempt on the same plan generation waits this long,
doubled for every further attempt (capped at GROWTH_RETRY_MAX_S)."""
GROWTH_RETRY_MAX_S = 300.0
CAPACITY_WAIT_S = 60.0
"""Default longest wait of a failed job for workers to come back before it is FAILED (seconds)."""

CAUSE_LABELS = ("worker-failed", "node-lost", "hang", "rendezvous-timeout", "grow", "drain", "rebalance", "migrate",
                "manual")
"""Bounded values of the ``cause`` metric label; anything else is counted as ``manual``."""


# ------------------------------------------------------------------ records <-> assignments
def plan_records(plan: Plan, workers: Mapping[int, WorkerStatusRecord]) -> dict[int, WorkerStatusRecord]:
    """rank of ``plan`` -> the status record of the worker holding that (node, slot) for it.

    A record counts for the plan when it was written for this generation (or an
    unknown one, 0), or when it is a *failure* written after the plan was (a
    survivor that died before its agent adopted the new generation). Records of
    newer generations than the plan are ignored (stale mirror); so are older
    records that are not failures after the plan (e.g. the failure that caused it).
    """
    newest: dict[tuple[str, int], WorkerStatusRecord] = {}
    for rec in workers.values():
        key = (rec.node, rec.slot)
        if key not in newest or rec.time >= newest[key].time:
            newest[key] = rec
    planned_at = float(plan.extra.get("planned_at", 0.0) or 0.0)
    out: dict[int, WorkerStatusRecord] = {}
    for a in plan.workers:
        rec = newest.get((a.node, a.slot))
        if rec is None or rec.generation > plan.generation:
            continue
        if rec.generation in (0, plan.generation) or (rec.failed and planned_at and rec.time >= planned_at):
            out[a.rank] = rec
    return out


def newest_by_slot(plan: Plan, workers: Mapping[int, WorkerStatusRecord]) -> dict[int, WorkerStatusRecord]:
    """rank of ``plan`` -> the newest record of its (node, slot), whatever its generation (for display:
    a survivor shows its pid even before its agent re-wrote its status for the new rank)."""
    newest: dict[tuple[str, int], WorkerStatusRecord] = {}
    for rec in workers.values():
        key = (rec.node, rec.slot)
        if key not in newest or rec.time >= newest[key].time:
            newest[key] = rec
    return {a.rank: newest[(a.node, a.slot)] for a in plan.workers if (a.node, a.slot) in newest}


# ------------------------------------------------------------------ failures
@dataclass(kw_only=True, frozen=True)
class Failure:
    """Ranks of the current plan that are gone, and what we know of when it happened."""

    cause: str
    """``worker-failed`` or ``node-lost`` (the first that applies)."""
    lost_ranks: frozenset[int]
    lost_nodes: frozenset[str]
    failed_at: float
    """Best estimate of when it happened: the agent's exit record time for a worker; for a
    lost node, the last progress heartbeat of its ranks (the host cannot report its own death)."""
    description: str


def training_finished(plan: Plan, workers: Mapping[int, WorkerStatusRecord]) -> bool:
    """A rank of ``plan`` exited 0 at the plan's generation. A trainer exits 0 only past the
    job's final barrier, which every rank enters after the last step: the training is done,
    whatever happens to the other ranks' processes or nodes afterwards. (Idle survivors,
    drained and abandoned workers also exit 0, but their slots are not in the plan, or their
    record is of an older generation.)"""
    return any(rec.succeeded and rec.generation == plan.generation
               for rec in plan_records(plan, workers).values())


def find_failure(plan: Plan, workers: Mapping[int, WorkerStatusRecord], live_nodes: Iterable[str],
                 progress: Mapping[int, ProgressRecord] | None = None, now: float = 0.0) -> Failure | None:
    """The failure of the current plan to recover from, or None if every rank is fine. None
    too once the training finished: a node lost while its workers were exiting must not
    re-plan a finished job (new workers would find no state and fail it)."""
    if training_finished(plan, workers):
        return None
    records = plan_records(plan, workers)
    live = set(live_nodes)
    lost_ranks: set[int] = set()
    lost_nodes: set[str] = set()
    parts: list[str] = []
    times: list[float] = []
    cause = ""
    for rank in sorted(records):
        rec = records[rank]
        if rec.failed:
            how = f"signal {rec.signal}" if rec.signal else f"exit code {rec.exit_code}"
            parts.append(f"rank {rank} on {rec.node} {rec.state.lower()} ({how})")
            lost_ranks.add(rank)
            times.append(rec.time or now)
            cause = cause or "worker-failed"
    for node in sorted({a.node for a in plan.workers} - live):
        ranks = [a.rank for a in plan.workers if a.node == node
                 and not (a.rank in records and records[a.rank].succeeded)]
        if not ranks:
            continue
        parts.append(f"node {node} lost (ranks {ranks})")
        lost_nodes.add(node)
        lost_ranks.update(ranks)
        heartbeats = [p.time for r, p in (progress or {}).items() if r in ranks and p.time > 0]
        times.append(max(heartbeats) if heartbeats else now)
        cause = cause or "node-lost"
    if not parts:
        return None
    return Failure(cause=cause, lost_ranks=frozenset(lost_ranks), lost_nodes=frozenset(lost_nodes),
                   failed_at=min(times), description="; ".join(parts))


def fail_permanently(plan: Plan, failure: Failure, workers: Mapping[int, WorkerStatusRecord]) -> str | None:
    """The FAILED message when a lost rank's agent marked its failure ``permanent`` (it would
    repeat on any slot: the host memory limit), else None (recover). Pure."""
    records = plan_records(plan, workers)
    causes = [f"rank {rank} on {records[rank].node}: {records[rank].cause}" for rank in sorted(failure.lost_ranks)
              if rank in records and records[rank].failed and records[rank].permanent]
    if not causes:
        return None
    return f"{'; '.join(causes)} (not recovered: it would fail the same way on any slot)"


def fail_before_first_step(plan: Plan, failure: Failure, *, step: int,
                           errors: Mapping[int, str] | None = None) -> str | None:
    """The FAILED message for a failure before the job's first step completed, or None (recover).

    Before the first step there is nothing to recover: no snapshot exists yet, and what
    failed is the launch or the first step itself (a bad setting, an unsupported backend
    such as CUDA point-to-point over gloo, out of memory), which a re-plan repeats; its
    message would then hide the cause. So the job fails at once, naming the root cause: each
    lost rank's exit code or signal (``failure.description``) and, where the control side
    has it, the worker's last exception line (``errors``: rank -> line). ``step``: the
    newest step any rank reported (0: none)."""
    if step > 0 or plan.generation != 1:
        return None
    lines = [f"rank {rank} last error: {errors[rank]}" for rank in sorted(failure.lost_ranks)
             if errors and errors.get(rank)]
    cause = "; ".join([failure.description, *lines])
    return f"failed before the first step completed (not recovered: there is no state to recover yet): {cause}"


def all_ranks_on_generation(plan: Plan, progress: Mapping[int, ProgressRecord],
                            workers: Mapping[int, WorkerStatusRecord]) -> bool:
    """Every rank of ``plan`` has done a step at its generation (or already exited 0 for it)."""
    records = plan_records(plan, workers)
    for a in plan.workers:
        p = progress.get(a.rank)
        if p is not None and p.generation >= plan.generation:
            continue
        rec = records.get(a.rank)
        if rec is not None and rec.succeeded and rec.generation == plan.generation:
            continue
        return False
    return True


# ------------------------------------------------------------------ cluster view inputs
def free_slots_for(schedulable: Mapping[str, Sequence[int]],
                   used: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Startable slots per node: slots of ready, uncordoned nodes that no active plan uses.
    (An idle survivor is in no plan: it exits by itself, its slot is free.)"""
    free = {node: sorted(s for s in slots if s not in set(used.get(node, ()))) for node, slots in schedulable.items()}
    return {node: slots for node, slots in free.items() if slots}


def failed_slots(plan: Plan | None) -> set[tuple[str, int]]:
    """(node, slot) of this job quarantined or cordoned when ``plan`` was written
    (``extra["failed_slots"]``, see controller/quarantine.py). For readers without a clock;
    the time-aware view (a cool-down ends, a node rejoins) is ``quarantine.excluded_slots``.
    Lost nodes are not listed: a node that comes back (a new agent) is a node joining."""
    out: set[tuple[str, int]] = set()
    for item in (plan.extra.get("failed_slots") if plan is not None else None) or []:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int):
            out.add((item[0], item[1]))
    return out


def without_slots(free: Mapping[str, Sequence[int]], excluded: set[tuple[str, int]]) -> dict[str, list[int]]:
    kept = {node: [s for s in slots if (node, s) not in excluded] for node, slots in free.items()}
    return {node: slots for node, slots in kept.items() if slots}


# ------------------------------------------------------------------ planned changes
def switch_step(step: int, step_time_s: float) -> int:
    """The step boundary for a planned change (growth, drain, rebalance): far enough ahead that
    every rank reads the plan before it (GROWTH_MARGIN_S of steps), close enough to matter."""
    if step_time_s > 0:
        margin = math.ceil(GROWTH_MARGIN_S / step_time_s)
    else:
        margin = MIN_MARGIN_STEPS
    return step + max(MIN_MARGIN_STEPS, min(MAX_MARGIN_STEPS, margin))


def should_grow(*, phase: str, plan: Plan, max_workers: int, free_slot_count: int, step: int,
                total_steps: int, at_step: int, settled: bool, jobs_waiting: bool = False,
                growth: GrowthRecord | None = None, now: float = 0.0) -> tuple[bool, str]:
    """Whether to start a growth now (``controller.replan.grow`` decides the layout).

    ``growth``: the job's current growth record, if any: one being prepared for this
    plan generation blocks another, and an abandoned one delays the next attempt."""
    if phase != "RUNNING":
        return False, f"job is {phase}"
    if jobs_waiting:
        return False, "pending jobs come first: free slots are theirs"
    if not settled:
        return False, "the last plan change has not settled"
    if growth is not None and growth.base_generation == plan.generation:
        if growth.state == "PREPARING":
            return False, f"growth {growth.id} is being prepared"
        if growth.state == "ABANDONED" and now < growth.retry_after:
            return False, f"growth abandoned ({growth.reason}); next attempt in {growth.retry_after - now:.0f} s"
    if plan.world_size >= max_workers:
        return False, f"job has {plan.world_size} workers, max_workers={max_workers}"
    if free_slot_count == 0:
        return False, "no free slot on a ready, uncordoned node"
    if step < 1:
        return False, "job has not done a step yet"
    if at_step >= total_steps:
        return False, f"switch step {at_step} is past the job's last step {total_steps}"
    return True, f"{free_slot_count} free slot(s), job below max_workers={max_workers}"


# ------------------------------------------------------------------ two-phase growth
#
#   should_grow ──► start_growth: GrowthRecord PREPARING (plan g unchanged; agents start the
#        ▲          joiners with the tentative plan g+1, which get ready and say so)
#        │                 │
#        │          growth_decision (every reconcile pass):
#        │            "wait"    joiners still starting, deadline ahead
#        │            "commit"  every joiner READY -> commit_plan: plan g+1 with
#        │                      switch_at_step a few steps ahead; growth COMMITTED
#        └─ retry ─── "abandon"  a joiner exited / the deadline passed -> ABANDONED with a
#           after               backoff (retry_after)
#           backoff   "withdraw" a joiner's node left or was cordoned / plan g changed meanwhile
#                                -> ABANDONED, no backoff; either way the agents stop the joiners
def joiners_of(base: Plan, new: Plan) -> list[dict[str, Any]]:
    """The workers of ``new`` on (node, slot)s that ``base`` does not use: the ones to start."""
    old = {(w.node, w.slot) for w in base.workers}
    return [{"node": w.node, "slot": w.slot, "rank": w.rank} for w in new.workers if (w.node, w.slot) not in old]


def start_growth(base: Plan, tentative: Plan, *, growth_id: str, now: float, previous: GrowthRecord | None = None,
                 timeout_s: float = GROWTH_PREPARE_TIMEOUT_S) -> GrowthRecord:
    """The PREPARING record for growing ``base`` into ``tentative`` (its switch step is decided at commit)."""
    attempt = previous.attempt + 1 if previous is not None and previous.base_generation == base.generation else 1
    plan = Plan.from_dict({**tentative.to_dict(), "switch_at_step": -1})
    return GrowthRecord(id=growth_id, base_generation=base.generation, plan=plan.to_dict(),
                        joiners=joiners_of(base, tentative), state="PREPARING", started=now,
                        deadline=now + timeout_s, attempt=attempt, reason=tentative.reason)


def growth_decision(*, growth: GrowthRecord | None, plan: Plan, joiners: Mapping[tuple[str, int], JoinerRecord],
                    live_nodes: Iterable[str], cordoned: Iterable[str] = (), now: float) -> tuple[str, str]:
    """What to do with a growth being prepared: ("none" | "wait" | "commit" | "abandon" |
    "withdraw", reason).

    "abandon": the growth's own workers failed or were not ready in time (the next attempt
    waits a growing backoff); "withdraw": a node of a new worker left or was cordoned, or the
    plan changed underneath, which says nothing about the growth: the next attempt may come at
    once and takes only ready nodes (a node that keeps failing is quarantined, so this cannot
    oscillate).
    ``joiners``: the JoinerRecords by (node, slot); records of another growth id are stale."""
    if growth is None or growth.state != "PREPARING":
        return "none", "no growth being prepared"
    if growth.base_generation != plan.generation:
        return "withdraw", (f"plan generation {plan.generation} replaced generation {growth.base_generation} "
                            "while the new workers got ready")
    live, fenced = set(live_nodes), set(cordoned)
    waiting: list[str] = []
    for node, slot in growth.joiner_slots():
        if node not in live:
            return "withdraw", f"node {node} of a new worker is gone"
        if node in fenced:
            return "withdraw", f"node {node} of a new worker was cordoned"
        rec = joiners.get((node, slot))
        if rec is not None and rec.growth_id == growth.id and rec.state != "READY":
            why = f": {rec.reason}" if rec.reason else ""
            return "abandon", f"the new worker on {node}/{slot} {rec.state.lower()} before it was ready{why}"
        if rec is None or rec.growth_id != growth.id:
            waiting.append(f"{node}/{slot}")
    if not waiting:
        return "commit", f"{len(growth.joiners)} new worker(s) ready"
    if now >= growth.deadline:
        return "abandon", (f"new worker(s) {', '.join(waiting)} not ready within "
                           f"{growth.deadline - growth.started:.0f} s")
    return "wait", f"waiting for {', '.join(waiting)}"


def commit_plan(growth: GrowthRecord, *, at_step: int, now: float) -> Plan:
    """Plan g+1 of a prepared growth: the tentative plan, switching at ``at_step``."""
    tentative = Plan.from_dict(growth.plan)
    return Plan.from_dict({**tentative.to_dict(), "switch_at_step": at_step,
                           "reason": f"{tentative.reason} at step {at_step}",
                           "extra": {**tentative.extra, "planned_at": now, "growth_id": growth.id,
                                     "prepare_s": max(now - growth.started, 0.0)}})


def capacity_wait_start(*, failed_at: float, planned_at: float, now: float) -> float:
    """When the wait for workers of a failure with too few survivors starts. Pure.

    The failure's time, but never before the current plan was written: a lost node's failure
    time is its ranks' last progress heartbeat, which in a job that has been recovering for a
    while (no step since) predates the plan by minutes, and would fail the job at once while
    its agent restarts (soak, issue 16). Never after ``now`` either (clocks of replicas)."""
    return min(max(failed_at, planned_at), now)


def wait_for_capacity(*, failed_at: float, now: float, wait_s: float) -> tuple[bool, str]:
    """Whether a failure that leaves too few workers for any layout should wait for workers to
    come back (True) or fail the job (False), and why. Pure. A node lost for seconds (an agent
    restarted) must not end a job that its in-memory copies or its disk checkpoints can resume."""
    left = failed_at + wait_s - now
    if left > 0:
        return True, f"the job fails if none come back by {wait_s:.0f} s after the failure"
    return False, f"no workers came back within {wait_s:.0f} s"


def end_growth(growth: GrowthRecord, *, state: str, reason: str, now: float, backoff: bool = True) -> GrowthRecord:
    """The record after a commit or an abandon (ABANDONED sets the retry backoff, unless
    ``backoff`` is False: a withdrawn growth may be retried at once)."""
    retry = 0.0
    if state == "ABANDONED":
        retry = now + (min(GROWTH_RETRY_MAX_S, GROWTH_RETRY_S * 2 ** max(growth.attempt - 1, 0)) if backoff else 0.0)
    return GrowthRecord(**{**growth.to_dict(), "state": state, "reason": reason, "ended": now,
                           "retry_after": retry})


def should_drain(*, phase: str, plan: Plan, node: str, settled: bool, at_step: int = 0,
                 total_steps: int = 1 << 62) -> tuple[bool, str]:
    """Whether a job must move off a draining node now."""
    if not plan.workers_on(node):
        return False, f"no worker on {node}"
    if phase != "RUNNING":
        return False, f"job is {phase}"
    if not settled:
        return False, "the last plan change has not settled"
    if at_step >= total_steps:
        return False, f"the job ends (step {total_steps}) before the switch step {at_step}: it leaves the node then"
    return True, f"node {node} is draining"


def rebalance_plan(current: Plan, shares: Sequence[int], *, at_step: int, now: float,
                   cause: str = "rebalance") -> tuple[Plan | None, str]:
    """Plan g+1 with the same workers and layout and new per-dp-rank sample shares at ``at_step``."""
    shares = tuple(int(s) for s in shares)
    total = sum(current.sample_shares)
    if len(shares) != current.dp or any(s < 1 for s in shares) or sum(shares) != total:
        return None, (f"shares {list(shares)} must be {current.dp} positive numbers summing to the "
                      f"global batch {total}")
    if shares == tuple(current.sample_shares):
        return None, "shares unchanged"
    generation = current.generation + 1
    reason = f"{cause}: sample shares {list(current.sample_shares)} -> {list(shares)} at step {at_step}"
    plan = new_plan(job_id=current.job_id, generation=generation,
                    placement=[(w.node, w.slot) for w in sorted(current.workers, key=lambda w: w.rank)],
                    dp=current.dp, pp=current.pp, zero_stage=current.zero_stage,
                    layer_partition=current.layer_partition, global_batch_size=total, sample_shares=shares,
                    store_address=current.store_address, switch_at_step=at_step, reason=reason,
                    extra={"cause": cause, "planned_at": now, "previous_generation": current.generation,
                           "previous_ranks": {str(w.rank): w.rank for w in current.workers},
                           "idle": list(current.extra.get("idle", []) or [])})
    return plan, reason


# ------------------------------------------------------------------ recovery records
def layout(plan: Plan) -> dict[str, int]:
    return {"dp": plan.dp, "pp": plan.pp, "zero_stage": plan.zero_stage}


def cause_label(cause: str) -> str:
    """A bounded metric label for a cause string (``drain node-1`` -> ``drain``)."""
    head = cause.split()[0].split(":")[0] if cause.strip() else "manual"
    return head if head in CAUSE_LABELS else "manual"


def pending_recovery(*, cause: str, old: Plan, new: Plan, at_step: int, failed_at: float, seen_at: float,
                     planned_at: float, prepare_s: float = 0.0) -> dict[str, Any]:
    """The recovery entry written with plan g+1 (completed later by ``complete_recovery``).

    detection = failure -> controller saw it; plan = saw -> plan written. For a
    planned change (growth, drain, rebalance) there is no failure: both are the
    time from the request to the plan, and total runs from the plan to the first
    step done at the new generation (it includes the steps run up to the switch
    boundary; the stall at the boundary is the workers' own ``worker_total_s``).

    ``prepare_s`` (two-phase growth): growth started -> every new worker ready, before
    the plan was written (so not part of ``total_s``).
    """
    return {
        "cause": cause, "generation": new.generation, "old_layout": layout(old), "new_layout": layout(new),
        "at_step": at_step, "detection_s": max(seen_at - failed_at, 0.0), "plan_s": max(planned_at - seen_at, 0.0),
        "rebuild_s": 0.0, "transfer_s": 0.0, "total_s": 0.0, "steps_lost": 0, "bytes_moved": 0,
        "bytes_local": 0, "from_disk": False, "time": failed_at, "failed_at": failed_at, "seen_at": seen_at,
        "planned_at": planned_at, "switch_at_step": new.switch_at_step, "reason": new.reason, "complete": False,
        "prepare_s": prepare_s,
        # survivors the new layout leaves idle, and why (controller/replan.py idle_reason)
        "idle": len(new.extra.get("idle", []) or []), "idle_reason": str(new.extra.get("idle_reason", "") or ""),
        # a failure's plan on the survivors alone or with free slots, and why (controller/replan.py survivors_only)
        **survivors_first_fields(new),
    }


def survivors_first_fields(plan: Plan) -> dict[str, Any]:
    """``survivors_only`` (bool) and ``survivors_reason`` for the recovery entry of ``plan``;
    empty for a plan that did not weigh it (growth, drain, rebalance, migration)."""
    weighed = plan.extra.get("survivors_first")
    if not isinstance(weighed, dict):
        return {}
    return {"survivors_only": bool(weighed.get("chosen")), "survivors_reason": str(weighed.get("why", "") or "")}


def complete_recovery(entry: Mapping[str, Any], reports: Sequence[Mapping[str, Any]],
                      first_step_times: Sequence[float], *, superseded: bool = False) -> dict[str, Any]:
    """Fill a pending entry from the workers' recovery records of its generation.

    rebuild/transfer/worker_total: the slowest rank that was training before (the step waits
    for it); a rank that joined with no state ("join") counts only when no other reported: its
    own clock starts when it sees the plan, so for a planned switch it includes the wait for the
    survivors to reach the boundary, which stalls nobody. bytes_moved / bytes_local: the sums;
    at_step: the newest step the ranks or the controller saw committed; steps_lost: at_step -
    the resumed step (or the largest any rank saw), so a recovery whose ranks are all new
    still counts the steps it redoes; total: failure -> first step at the new
    generation done by every rank (the latest of the ranks' first-step times). comm_error: the
    most telling class of the survivors' communication failures (common.comm_errors),
    comm_errors: per rank of the new generation, comm_error_detail: the words behind it.
    """
    out = dict(entry)
    gen = int(entry.get("generation", 0))
    mine = [r for r in reports if int(r.get("new_generation", -1)) == gen]
    timed = [r for r in mine if not str(r.get("cause", "")).startswith("join")] or mine
    if mine:
        out["rebuild_s"] = max(float(r.get("rebuild_s", 0.0) or 0.0) for r in timed)
        out["transfer_s"] = max(float(r.get("transfer_s", 0.0) or 0.0) for r in timed)
        out["bytes_moved"] = sum(int(r.get("bytes_moved", 0) or 0) for r in mine)
        out["bytes_local"] = sum(int(r.get("bytes_local", 0) or 0) for r in mine)
        # at_step: the newest step anyone saw committed. When no survivor knows it (every rank
        # is new), the controller's view of the job's progress at the failure does.
        at_step = max([int(entry.get("at_step", 0) or 0)] + [int(r.get("at_step", 0) or 0) for r in mine])
        resumed = [max(int(r["resumed_step"]), 0) for r in timed if r.get("resumed_step") is not None]
        out["steps_lost"] = max([int(r.get("steps_lost", 0) or 0) for r in mine] +
                                ([at_step - min(resumed)] if resumed else []) + [0])
        out["from_disk"] = any(bool(r.get("from_disk")) for r in mine)
        out["at_step"] = at_step
        out["ranks_reported"] = len(mine)
        # the workers' own MTTR (noticed -> ready): for a planned switch, the stall at the boundary
        out["worker_total_s"] = max(float(r.get("total_s", 0.0) or 0.0) for r in timed)
        # how the survivors' communication failed (common.comm_errors): the most telling class,
        # per rank, and one rank's words for it
        seen = {int(r.get("rank", -1)): (str(r.get("comm_error") or ""), str(r.get("comm_error_detail") or ""))
                for r in mine if r.get("comm_error")}
        if seen:
            out["comm_error"] = most_telling(c for c, _ in seen.values())
            out["comm_errors"] = {str(rank): c for rank, (c, _) in sorted(seen.items())}
            out["comm_error_detail"] = next(d for c, d in seen.values() if c == out["comm_error"])
        bad = sorted({str(b) for r in mine for b in (r.get("bad_copies") or [])})
        if bad:
            out["bad_copies"] = bad
    if first_step_times:
        out["total_s"] = max(max(first_step_times) - float(entry.get("failed_at", entry.get("time", 0.0))), 0.0)
    out["complete"] = True
    if superseded:
        out["superseded"] = True
    return out


def open_recovery(recoveries: Sequence[Mapping[str, Any]], generation: int) -> int | None:
    """Index of the incomplete entry for ``generation``, if any."""
    for i in range(len(recoveries) - 1, -1, -1):
        r = recoveries[i]
        if int(r.get("generation", 0)) == generation and not r.get("complete", True):
            return i
    return None


def close_superseded(recoveries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries still open when a newer plan replaces theirs are closed as superseded."""
    return [complete_recovery(r, [], [], superseded=True) if not r.get("complete", True) else dict(r)
            for r in recoveries]


# ------------------------------------------------------------------ what the next failure costs
def snapshot_redundancy(plan: Plan) -> tuple[bool, bool, str]:
    """(covers one worker failure, covers the loss of one node, the statement) for the in-memory
    snapshots of ``plan``: each rank replicates its snapshot to a buddy (``common.layout.buddy_ring``,
    the ring the trainer uses), on another node whenever the placement allows."""
    node = {w.rank: w.node for w in plan.workers}
    same = ranks_replicated_on_their_node(node)
    if same is None:
        return False, False, "none: a single worker has no buddy to hold a copy of its state"
    if not same:
        return True, True, "one failure, or the loss of one node: every rank's replica is on another node"
    nodes = sorted({node[r] for r in same})
    return True, False, (f"one worker failure, not the loss of a node: ranks {same} keep their replica on "
                         f"their own node ({', '.join(nodes)})")


def next_failure_cost(spec: JobSpec, plan: Plan, *, step: int, recoverable_step: int) -> tuple[str, str]:
    """(redundancy, what the next failure would cost) for the job status.

    From memory: the steps since ``recoverable_step``, the newest step every rank's off-node copy
    holds. From disk (what the snapshots do not cover): while the replicas do not cover a failure,
    the trainer writes every snapshot to disk as well (``trainer.decisions.disk_checkpoint_due``),
    so about as many steps as memory would lose; before any snapshot, the steps since the start."""
    worker_ok, node_ok, redundancy = snapshot_redundancy(plan)
    if recoverable_step > 0:
        behind = max(step - recoverable_step, 0)
        memory = f"{behind} step(s) from memory"
    else:
        behind = step
        memory = f"{step} step(s): no snapshot replicated yet"
    if spec.elastic.checkpoint_every <= 0:
        disk = "the job (elastic.checkpoint_every: 0, no disk checkpoint)"
    else:
        disk = (f"about {behind} step(s) from disk (every snapshot also goes to disk while memory "
                f"does not cover this)")
    worker = memory if worker_ok else disk
    node = memory if node_ok else disk
    if worker == node:
        return redundancy, f"a worker or node failure: {worker}"
    return redundancy, f"a worker failure: {worker}; a node loss: {node}"
