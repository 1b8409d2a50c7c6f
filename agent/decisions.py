"""Pure decisions of the agent: what to do with a plan, when to publish progress.

Nothing here touches etcd, processes or clocks; every function reads as a test.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from protos.plan import Plan, PlanError, WorkerAssignment
from protos.records import GrowthRecord


@dataclass(kw_only=True, frozen=True)
class LocalWorker:
    """What the decision needs to know about a worker this agent started.

    A worker is identified by ``(job, slot)`` on its node: ranks are renumbered
    when the controller changes the layout, the process on a slot is not.
    """

    job: str
    rank: int
    """Its rank in ``generation``."""
    slot: int
    generation: int
    """The plan generation the worker was started for (or last adopted)."""
    alive: bool
    retired: bool = False
    """Left out of a newer plan: it is on its way out and is never adopted again."""
    preparing: str = ""
    """The growth id it was started for, while that growth is not committed: it runs outside
    every plan (``generation`` is the tentative one) and waits to be adopted by the plan."""


@dataclass(kw_only=True, frozen=True)
class Start:
    assignment: WorkerAssignment
    generation: int
    reason: str
    growth_id: str = ""
    """Set for a worker of a growth being prepared (launched with the tentative plan)."""


@dataclass(kw_only=True, frozen=True)
class Stop:
    """Stop now (the job is cancelled or over)."""

    job: str
    rank: int
    reason: str
    slot: int = 0


@dataclass(kw_only=True, frozen=True)
class Adopt:
    """A running worker stays: the new generation names its slot, maybe with another rank."""

    job: str
    rank: int
    """Its rank in the new generation."""
    generation: int
    slot: int = 0


@dataclass(kw_only=True, frozen=True)
class Retire:
    """A live worker the new generation does not name (its node is drained, it was left idle,
    a layout shrank). The worker sees the plan and exits by itself, after handing over its
    state at the switch step; the agent stops it only if it is still there after a grace period."""

    job: str
    rank: int
    slot: int
    reason: str


Action = Start | Stop | Adopt | Retire


def plan_actions(node: str, local: list[LocalWorker], plan: Plan, *, cancelled: bool = False) -> list[Action]:
    """What this node does with ``plan`` given the workers it started for that job.

    * a plan older than a generation we already run is stale: nothing;
    * a cancelled job: stop every live worker, start nothing;
    * a live worker whose slot the plan names is adopted (with the plan's rank for that
      slot), never restarted: survivors keep their process across generations;
    * any other live worker (idle survivor, drained, dropped) is retired: it exits by
      itself (the worker side), and is stopped after a grace period if it does not;
    * an assigned slot with no live worker and no worker that already ran there for this
      generation gets a new worker (growth, a spare, a restart on a new generation) —
      a worker that finished or failed in this generation is the controller's to re-plan;
    * an assigned slot whose worker was retired earlier and is still exiting waits: the
      supervisor applies the plan again when that worker is gone;
    * a worker prepared for a growth (``preparing``) belongs to no plan older than the one
      it was started for: such plans leave it alone. From that generation on it is like
      any other: adopted on a slot the plan names (the growth was committed), retired
      otherwise. A dead one never blocks a start (its growth was never committed).
    """
    mine = [w for w in local if w.job == plan.job_id and not (w.preparing and not w.alive)]
    if any(w.generation > plan.generation for w in mine if not w.preparing):
        return []
    mine = [w for w in mine if not (w.preparing and w.generation > plan.generation)]
    if cancelled:
        return [Stop(job=w.job, rank=w.rank, slot=w.slot, reason="cancelled") for w in mine if w.alive]

    wanted = {a.slot: a for a in plan.workers_on(node)}
    actions: list[Action] = []
    for w in mine:
        if not w.alive or w.retired:
            continue
        a = wanted.get(w.slot)
        if a is not None:
            if w.generation < plan.generation or w.rank != a.rank or w.preparing:
                actions.append(Adopt(job=w.job, rank=a.rank, slot=w.slot, generation=plan.generation))
        else:
            actions.append(Retire(job=w.job, rank=w.rank, slot=w.slot,
                                  reason=f"not in plan generation {plan.generation}"))

    for slot, a in sorted(wanted.items()):
        same = [w for w in mine if w.slot == slot]
        if any(w.alive for w in same):
            continue
        if any(w.generation == plan.generation for w in same):
            continue  # it already ran for this generation
        actions.append(Start(assignment=a, generation=plan.generation,
                             reason=f"plan generation {plan.generation} ({plan.reason or 'no reason'})"))
    return actions


def growth_actions(node: str, local: list[LocalWorker], growth: GrowthRecord | None, *, job: str,
                   plan_generation: int | None, cancelled: bool = False) -> list[Action]:
    """What this node does for a job's two-phase growth (controller/recovery.py).

    * PREPARING on the job's current plan (``plan_generation``, None when unknown): start
      a worker, launched with the tentative plan, on each of this node's joiner slots that
      has no live worker of the job and did not already run one for this growth id;
    * a worker still preparing for another growth id, for an ABANDONED growth, or with no
      growth record at all (deleted) is stopped: that growth will never switch;
    * COMMITTED: nothing here; plan g+1 adopts the prepared workers (``plan_actions``).
    """
    mine = [w for w in local if w.job == job]
    actions: list[Action] = []
    keep = growth.id if growth is not None and growth.state in ("PREPARING", "COMMITTED") else None
    for w in mine:
        if w.alive and w.preparing and w.preparing != keep:
            why = "growth abandoned" if growth is not None and growth.id == w.preparing else "growth superseded"
            actions.append(Stop(job=w.job, rank=w.rank, slot=w.slot, reason=why))
    if growth is None or growth.state != "PREPARING" or cancelled:
        return actions
    if plan_generation is not None and plan_generation != growth.base_generation:
        return actions  # stale: the controller abandons it on its next pass
    try:
        tentative = Plan.from_dict(growth.plan)
    except PlanError:
        return actions
    stopping = {a.slot for a in actions}
    for slot in sorted(s for n, s in growth.joiner_slots() if n == node):
        same = [w for w in mine if w.slot == slot]
        if any(w.alive and w.slot not in stopping for w in same) or any(w.preparing == growth.id for w in same):
            continue  # busy, or already started (and maybe exited) for this growth
        assignment = next((a for a in tentative.workers_on(node) if a.slot == slot), None)
        if assignment is not None:
            actions.append(Start(assignment=assignment, generation=tentative.generation, growth_id=growth.id,
                                 reason=f"growth {growth.id}: prepare for generation {tentative.generation}"))
    return actions


def should_publish(last_published: float | None, now: float, min_interval_s: float) -> bool:
    """Throttle: at most one progress write per rank every ``min_interval_s`` seconds."""
    return last_published is None or now - last_published >= min_interval_s


def exit_state(returncode: int, kill_requested: bool) -> tuple[str, str, str]:
    """(state, signal name, metric reason) of a worker exit.

    ``returncode`` follows subprocess: negative means killed by that signal.
    """
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"SIG{-returncode}"
    else:
        sig = ""
    if kill_requested:
        return "KILLED", sig, "killed"
    if returncode == 0:
        return "EXITED", "", "ok"
    if returncode < 0:
        return "FAILED", sig, "signal"
    return "FAILED", "", "error"


GB = 1e9
"""Bytes in a GB (the unit of ``resources.host_memory_gb`` and ``--worker-memory-limit-gb``)."""


def memory_limit_bytes(spec_gb: float, agent_gb: float) -> int | None:
    """A worker's host memory limit: the smaller of the job's ``resources.host_memory_gb`` and
    the agent's ``--worker-memory-limit-gb`` (0 = that one sets none); None: no limit."""
    limits = [gb for gb in (spec_gb, agent_gb) if gb > 0]
    return int(min(limits) * GB) if limits else None


def memory_verdict(rss_bytes: int, limit_bytes: int | None) -> str | None:
    """The kill cause when a worker's resident set passed its limit, else None."""
    if limit_bytes is None or rss_bytes <= limit_bytes:
        return None
    return f"host memory limit exceeded: {rss_bytes / GB:.2f} GB > {limit_bytes / GB:.2f} GB"
