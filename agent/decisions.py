"""Pure decisions of the agent: what to do with a plan, when to publish progress.

Nothing here touches etcd, processes or clocks; every function reads as a test.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.plan import Plan, WorkerAssignment


@dataclass(kw_only=True, frozen=True)
class LocalWorker:
    """What the decision needs to know about a worker this agent started."""

    job: str
    rank: int
    slot: int
    generation: int
    """The plan generation the worker was started for (or last adopted)."""
    alive: bool


@dataclass(kw_only=True, frozen=True)
class Start:
    assignment: WorkerAssignment
    generation: int
    reason: str


@dataclass(kw_only=True, frozen=True)
class Stop:
    job: str
    rank: int
    reason: str


@dataclass(kw_only=True, frozen=True)
class Adopt:
    """A running worker stays: the new generation still names it (same rank, same slot)."""

    job: str
    rank: int
    generation: int


Action = Start | Stop | Adopt


def plan_actions(node: str, local: list[LocalWorker], plan: Plan, *, cancelled: bool = False) -> list[Action]:
    """What this node does with ``plan`` given the workers it started for that job.

    * a plan older than a generation we already run is stale: nothing;
    * a cancelled job: stop every live worker, start nothing;
    * a live worker the plan still names (rank and slot) is adopted, never restarted;
    * a live worker the plan no longer names is stopped;
    * an assignment with no worker of this generation is started; a worker that
      already ran (and exited) for this generation is not started again — a rank
      that finished or failed is the controller's to re-plan.
    """
    mine = [w for w in local if w.job == plan.job_id]
    if any(w.generation > plan.generation for w in mine):
        return []
    if cancelled:
        return [Stop(job=w.job, rank=w.rank, reason="cancelled") for w in mine if w.alive]

    wanted = {a.rank: a for a in plan.workers_on(node)}
    actions: list[Action] = []
    for w in mine:
        if not w.alive:
            continue
        a = wanted.get(w.rank)
        if a is None or a.slot != w.slot:
            actions.append(Stop(job=w.job, rank=w.rank,
                                reason=f"not in plan generation {plan.generation}"))
        elif w.generation < plan.generation:
            actions.append(Adopt(job=w.job, rank=w.rank, generation=plan.generation))

    for rank, a in sorted(wanted.items()):
        same = [w for w in mine if w.rank == rank and w.slot == a.slot]
        if any(w.alive for w in same):
            continue
        if any(w.generation == plan.generation for w in same):
            continue  # it already ran for this generation
        actions.append(Start(assignment=a, generation=plan.generation,
                             reason=f"plan generation {plan.generation} ({plan.reason or 'no reason'})"))
    return actions


def should_publish(last_published: float | None, now: float, min_interval_s: float) -> bool:
    """Throttle: at most one progress write per rank every ``min_interval_s`` seconds."""
    return last_published is None or now - last_published >= min_interval_s


def exit_state(returncode: int, kill_requested: bool) -> tuple[str, str, str]:
    """(state, signal name, metric reason) of a worker exit.

    ``returncode`` follows subprocess: negative means killed by that signal.
    """
    import signal as _signal

    if returncode < 0:
        try:
            sig = _signal.Signals(-returncode).name
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
