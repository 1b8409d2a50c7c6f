"""Plan generation g+1 from generation g: pure decisions, no I/O.

Every function here takes the job spec, the current plan and a view of the
cluster (which ranks are lost, which slots are free on which live node, where
each live node serves its rendezvous store) and returns ``(plan | None, reason)``.
``None`` means "no new plan": the reason says why (below ``min_workers``, the
global batch cannot be kept, nothing to grow into...).

Layout rules (issues 4 and 16, DESIGN principles 3-6; ``pick_layout``):

* Every pipeline depth ``pp`` is a candidate, with dp what remains:
  ``floor(capacity / pp)``, capped so every data-parallel rank gets at least
  ``micro_batch_size`` samples and the world stays within ``max_workers``.
* A candidate must fit memory: a pipeline at least as deep as the spec's, or a
  shallower one whose per-stage memory estimate (``common.layout.stage_memory_bytes``:
  parameters, gradients, AdamW state, ZeRO-sharded) is no larger than the spec
  layout's, which is known to fit. Only when no such layout reaches
  ``min_workers`` does a shallower one run anyway (the least memory per stage).
* Among those, the highest expected throughput wins (``common.layout.expected_throughput``:
  workers used, pipeline bubble (pp-1)/(m+pp-1), uneven shares); ties go to fewer
  workers, then the current depth, then the deeper pipeline. So 3 survivors of
  dp2·pp2 run as dp1·pp3 rather than dp1·pp2 with one idle.
* Survivors left over stay alive as idle spares (listed in ``plan.extra["idle"]``,
  with why in ``plan.extra["idle_reason"]``): survivors are never restarted.
* The global batch never changes: sample shares are recomputed to sum to it.
* ZeRO stage is unchanged; the trainer re-partitions the shards for the new dp.
* Survivors keep their node/slot, and (where possible) their stage and rank,
  so most state stays where it is and transfers are small.
* Failures switch now (``switch_at_step = -1``); growth and drain switch at a
  given step boundary, so no step is lost.
* A failure's plan runs on the survivors alone when they can (``survivors_only``: their
  layout fits memory and uses every one of them): free slots would make the survivors wait
  for a new process to start; the two-phase growth adds them while the job trains.
* The rendezvous store stays where it was if that node survives (else it moves
  to the node of new rank 0); every generation gets a fresh key prefix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from fractions import Fraction

from common.layout import expected_throughput, new_plan, partition_for_spec, pipeline_bubble, stage_memory_bytes
from common.spec import JobSpec, ModelSpec
from protos.plan import Plan, WorkerAssignment

Decision = tuple[Plan | None, str]
"""A new plan (or None) and the reason, readable in logs and job status."""

PartitionFn = Callable[[ModelSpec, int], Sequence[int]]
"""(model, pp) -> pp+1 layer boundaries; ``common.layout.partition_for_spec`` unless a test says otherwise."""


@dataclass(kw_only=True, frozen=True)
class Candidate:
    """Something that can run a rank of the new plan: a survivor or a free slot."""

    node: str
    slot: int
    old_rank: int | None = None
    """Rank in the current plan; None for a free slot (spare, new node)."""
    old_dp_rank: int | None = None
    old_layers: tuple[int, int] | None = None
    """[lo, hi) layers the survivor holds now; None for a spare."""


@dataclass(kw_only=True, frozen=True)
class ClusterView:
    """What the controller knows about the cluster when it replans."""

    lost_ranks: frozenset[int] = frozenset()
    """Ranks of the current plan that are gone (exited, hung, on a lost node)."""
    lost_nodes: frozenset[str] = frozenset()
    """Nodes that are gone; every rank on them is lost and their slots unusable."""
    free_slots: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Free (startable) slots per live node: spares, uncordoned or joined nodes."""
    store_addresses: Mapping[str, str] = field(default_factory=dict)
    """host:port of the rendezvous store each live node serves."""


# ----------------------------------------------------------------- entry points
def replan(
    spec: JobSpec,
    current: Plan,
    view: ClusterView,
    *,
    cause: str,
    now: float,
    partition: PartitionFn = partition_for_spec,
    survivors_first: bool = False,
) -> Decision:
    """Plan g+1 after a failure, switch now: survivors plus free slots.

    ``survivors_first`` (a failure's recovery): the survivors alone where ``survivors_only``
    says they can run without the free slots; the job then trains on at once instead of
    waiting for a new process to start, and grows back through the two-phase growth
    (controller/recovery.py). A planned move (a migration to a spare) leaves it off."""
    lost = set(view.lost_ranks) | {w.rank for w in current.workers if w.node in view.lost_nodes}
    if not lost:
        return None, "no rank of the current plan is lost"
    survivors = [w for w in current.workers if w.rank not in lost]
    taken = {(w.node, w.slot) for w in survivors}
    spares = [c for c in _spare_candidates(view, exclude_nodes=view.lost_nodes) if (c.node, c.slot) not in taken]
    alone, why = (survivors_only(spec, current, survivors=len(survivors), spares=len(spares), partition=partition)
                  if survivors_first else (False, ""))
    plan, reason = _plan_from(
        spec, current, survivors, [] if alone else spares,
        view=view, cause=cause, now=now, switch_at_step=-1, partition=partition, shrink_ok=True,
    )
    if plan is None or not survivors_first:
        return plan, reason
    if alone:
        reason = f"{reason}; survivors first: {why}"
    plan = dataclasses.replace(plan, reason=reason,
                               extra={**plan.extra, "survivors_first": {"chosen": alone, "why": why}})
    return plan, reason


def survivors_only(spec: JobSpec, current: Plan, *, survivors: int, spares: int,
                   partition: PartitionFn = partition_for_spec) -> tuple[bool, str]:
    """Whether a failure's plan g+1 runs on the ``survivors`` alone although ``spares`` free
    slots could take part, and why (issue 16). Pure.

    A free slot in a switch-now plan means a new process the survivors wait for before the
    first step (seconds: interpreter, imports, model build, CUDA init). The survivors alone
    train at once, and the two-phase growth brings the job back to the size the free slots
    allow while it trains. So: the survivors alone, when their best layout
    (``pick_layout``) fits memory, uses every survivor (none would idle and exit: principle
    9), and the free slots would add workers (else the plan is the same either way)."""
    if spares <= 0:
        return False, "no free slot: the survivors are all there is"
    alone, why = pick_layout(spec, current, survivors, partition=partition)
    if alone is None:
        return False, f"the survivors alone cannot run ({why}): free slots join now"
    if not alone.fits:
        return False, (f"the survivors' best layout {alone.describe()} exceeds the spec layout's memory "
                       "estimate: free slots join now")
    if alone.workers < survivors:
        return False, (f"the survivors' best layout {alone.describe()} leaves {survivors - alone.workers} of "
                       f"{survivors} idle: free slots join now")
    full, _ = pick_layout(spec, current, survivors + spares, partition=partition)
    if full is None or full.workers <= alone.workers:
        return False, f"free slots add no worker to {alone.describe()}"
    return True, (f"the {survivors} survivor{'' if survivors == 1 else 's'} run{'s' if survivors == 1 else ''} "
                  f"{alone.describe()} now, without waiting for a new process; "
                  f"the job grows back to {full.describe()} ({full.workers} workers) through a prepared growth")


def grow(
    spec: JobSpec,
    current: Plan,
    view: ClusterView,
    *,
    at_step: int,
    now: float,
    partition: PartitionFn = partition_for_spec,
) -> Decision:
    """Plan g+1 that adds free slots (a node joined or was uncordoned) at step ``at_step``."""
    if current.world_size >= spec.max_workers:
        return None, f"job already has {current.world_size} workers, max_workers={spec.max_workers}"
    plan, reason = _plan_from(
        spec, current, list(current.workers), _spare_candidates(view, exclude_nodes=view.lost_nodes),
        view=view, cause="grow", now=now, switch_at_step=at_step, partition=partition, shrink_ok=False,
    )
    if plan is not None and plan.world_size <= current.world_size:
        return None, (f"no growth possible: the best layout uses {plan.world_size} workers "
                      f"(dp={plan.dp} pp={plan.pp}), the job has {current.world_size}")
    return plan, reason


def drain(
    spec: JobSpec,
    current: Plan,
    view: ClusterView,
    *,
    node: str,
    at_step: int,
    now: float,
    partition: PartitionFn = partition_for_spec,
) -> Decision:
    """Plan g+1 without ``node`` at step ``at_step`` (its ranks hand their state over first)."""
    if not current.workers_on(node):
        return None, f"job has no worker on node {node!r}"
    staying = [w for w in current.workers if w.node != node]
    return _plan_from(
        spec, current, staying, _spare_candidates(view, exclude_nodes=view.lost_nodes | {node}),
        view=view, cause=f"drain {node}", now=now, switch_at_step=at_step, partition=partition, shrink_ok=True,
    )


# ---------------------------------------------------------------- the decision
@dataclass(kw_only=True, frozen=True)
class LayoutOption:
    """One candidate layout and what the choice weighs."""

    dp: int
    pp: int
    throughput: Fraction
    """``common.layout.expected_throughput`` (samples per one-worker sample time)."""
    bubble: float
    """Pipeline idle fraction, (pp-1)/(m+pp-1)."""
    stage_bytes: int | None
    """Per-worker memory estimate; None where not needed (pp >= the spec's)."""
    fits: bool
    """pp >= the spec's, or ``stage_bytes`` <= the spec layout's estimate."""

    @property
    def workers(self) -> int:
        return self.dp * self.pp

    def describe(self) -> str:
        return f"dp={self.dp}·pp={self.pp}"


def layout_options(spec: JobSpec, current: Plan, capacity: int, *,
                   partition: PartitionFn = partition_for_spec) -> list[LayoutOption]:
    """Every depth's best layout for ``capacity`` workers (dp as large as the batch and
    ``max_workers`` allow), shallowest first."""
    capacity = min(capacity, spec.max_workers)
    max_dp = max(1, spec.global_batch_size // spec.micro_batch_size)
    budget: int | None = None
    out = []
    for pp in range(1, min(capacity, spec.model.layers) + 1):
        dp = min(capacity // pp, max_dp)
        if dp < 1:
            continue
        share = -(-spec.global_batch_size // dp)
        bubble = pipeline_bubble(micro_batches=share / spec.micro_batch_size, pp=pp)
        stage_bytes = None
        fits = pp >= spec.parallelism.pp
        if not fits:  # estimated only where it decides something: partitioning is not free
            if budget is None:
                budget = spec_stage_bytes(spec, current, partition=partition)
            stage_bytes = stage_memory_bytes(spec.model, tuple(partition(spec.model, pp)),
                                             zero_stage=current.zero_stage, dp=dp)
            fits = stage_bytes <= budget
        out.append(LayoutOption(dp=dp, pp=pp, bubble=bubble, stage_bytes=stage_bytes, fits=fits,
                                throughput=expected_throughput(global_batch_size=spec.global_batch_size,
                                                               micro_batch_size=spec.micro_batch_size,
                                                               dp=dp, pp=pp)))
    return out


def spec_stage_bytes(spec: JobSpec, current: Plan, *, partition: PartitionFn = partition_for_spec) -> int:
    """Per-worker memory estimate of the spec's own layout: the budget a shallower pipeline must
    fit in (the job was submitted with it, so it fits the slots)."""
    return stage_memory_bytes(spec.model, tuple(partition(spec.model, spec.parallelism.pp)),
                              zero_stage=current.zero_stage, dp=spec.parallelism.dp)


def _preference(option: LayoutOption, current: Plan) -> tuple:
    """Highest throughput; then fewer workers (the same speed for less), the current depth
    (fewer layers move), the deeper pipeline (less memory per worker). Deterministic."""
    return (option.throughput, -option.workers, option.pp == current.pp, option.pp)


def pick_layout(spec: JobSpec, current: Plan, capacity: int, *,
                partition: PartitionFn = partition_for_spec) -> tuple[LayoutOption | None, str]:
    """The layout for ``capacity`` usable workers and why, or (None, why none works)."""
    capacity = min(capacity, spec.max_workers)
    if capacity < spec.elastic.min_workers:
        return None, f"only {capacity} workers available, below elastic.min_workers={spec.elastic.min_workers}"
    options = layout_options(spec, current, capacity, partition=partition)
    enough = [o for o in options if o.workers >= spec.elastic.min_workers]
    if not enough:
        tried = ", ".join(f"{o.describe()}={o.workers}" for o in options)
        return None, (f"no layout reaches elastic.min_workers={spec.elastic.min_workers} with {capacity} workers "
                      f"while keeping global_batch_size={spec.global_batch_size} at >= micro_batch_size="
                      f"{spec.micro_batch_size} per data-parallel rank (tried {tried})")
    safe = [o for o in enough if o.fits]
    if safe:
        best = max(safe, key=lambda o: _preference(o, current))
        return best, f"{best.describe()}: highest expected throughput ({float(best.throughput):.2f}) that fits memory"
    # nothing known to fit reaches min_workers: the least memory per worker, rather than failing the job
    best = min(enough, key=lambda o: (o.stage_bytes or 0, -o.throughput, -o.pp))
    return best, (f"{best.describe()}: shallower than the spec's pp={spec.parallelism.pp} although its per-worker "
                  f"memory estimate ({_mib(best.stage_bytes)}) exceeds the spec layout's "
                  f"({_mib(spec_stage_bytes(spec, current, partition=partition))}): no layout that fits reaches "
                  f"elastic.min_workers={spec.elastic.min_workers}")


def choose_layout(spec: JobSpec, current: Plan, capacity: int, *,
                  partition: PartitionFn = partition_for_spec) -> tuple[int, int] | str:
    """(dp, pp) for ``capacity`` usable workers (``pick_layout``), or the reason none works."""
    best, why = pick_layout(spec, current, capacity, partition=partition)
    return (best.dp, best.pp) if best is not None else why


def idle_reason(spec: JobSpec, current: Plan, capacity: int, chosen: LayoutOption, *,
                partition: PartitionFn = partition_for_spec) -> str:
    """Why ``chosen`` leaves some of ``capacity`` usable workers out ("" if it does not)."""
    if chosen.workers >= capacity:
        return ""
    if capacity > spec.max_workers:
        return f"the job is at elastic.max_workers={spec.max_workers}"
    options = layout_options(spec, current, capacity, partition=partition)
    whole = [o for o in options if o.workers == capacity]
    if not whole:
        max_dp = max(1, spec.global_batch_size // spec.micro_batch_size)
        return (f"no layout uses all {capacity}: dp·pp must equal it with pp <= model.layers={spec.model.layers} "
                f"and dp <= global_batch_size/micro_batch_size={max_dp}")
    other = max(whole, key=lambda o: _preference(o, current))
    if not other.fits:
        return (f"{other.describe()} would use all {capacity}, but its per-worker memory estimate "
                f"({_mib(other.stage_bytes)}) exceeds the spec layout's "
                f"({_mib(spec_stage_bytes(spec, current, partition=partition))})")
    return (f"{other.describe()} would use all {capacity}, but its expected throughput is not higher "
            f"({float(other.throughput):.2f} vs {float(chosen.throughput):.2f})")


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def assign(
    candidates: Sequence[Candidate], dp: int, partition: Sequence[int]
) -> tuple[dict[int, Candidate], list[Candidate]]:
    """Place candidates on the dp×pp grid: ({new rank: candidate}, unused candidates).

    Greedy on a score per (candidate, cell), highest first: how many of the
    cell's layers the candidate already holds (its parameters stay local), then
    keeping its old rank, then its old dp row. Spares score zero and fill what
    is left, in (node, slot) order. Deterministic.
    """
    pp = len(partition) - 1
    cells = [(d, s) for d in range(dp) for s in range(pp)]
    scored = []
    for ci, cand in enumerate(candidates):
        for d, s in cells:
            overlap = 0
            if cand.old_layers is not None:
                lo, hi = cand.old_layers
                overlap = max(0, min(hi, partition[s + 1]) - max(lo, partition[s]))
            same_rank = cand.old_rank == d * pp + s
            same_row = cand.old_dp_rank == d
            # survivors before spares even at zero overlap: their process is already warm
            survivor = cand.old_rank is not None
            scored.append(((overlap, same_rank, same_row, survivor), ci, d * pp + s))
    scored.sort(key=lambda x: (x[0], -x[1], -x[2]), reverse=True)
    placed: dict[int, Candidate] = {}
    used: set[int] = set()
    for _, ci, rank in scored:
        if rank in placed or ci in used:
            continue
        placed[rank] = candidates[ci]
        used.add(ci)
        if len(placed) == len(cells):
            break
    unused = [c for i, c in enumerate(candidates) if i not in used]
    return placed, unused


def _plan_from(
    spec: JobSpec,
    current: Plan,
    staying: Sequence[WorkerAssignment],
    spares: Sequence[Candidate],
    *,
    view: ClusterView,
    cause: str,
    now: float,
    switch_at_step: int,
    partition: PartitionFn,
    shrink_ok: bool,
) -> Decision:
    survivors = [
        Candidate(node=w.node, slot=w.slot, old_rank=w.rank, old_dp_rank=w.dp_rank,
                  old_layers=(current.layer_partition[w.pp_rank], current.layer_partition[w.pp_rank + 1]))
        for w in staying
    ]
    taken = {(c.node, c.slot) for c in survivors}
    spares = [c for c in spares if (c.node, c.slot) not in taken]
    chosen, why = pick_layout(spec, current, len(survivors) + len(spares), partition=partition)
    if chosen is None:
        return None, why
    dp, pp = chosen.dp, chosen.pp
    if not shrink_ok and dp * pp < current.world_size:
        return None, f"growth would shrink the job to dp={dp}·pp={pp}"
    bounds = current.layer_partition if pp == current.pp else tuple(partition(spec.model, pp))
    placed, unused = assign(survivors + spares, dp, bounds)
    ranked = sorted(placed.items())
    workers = [WorkerAssignment(rank=r, node=c.node, slot=c.slot, dp_rank=r // pp, pp_rank=r % pp)
               for r, c in ranked]
    store_address = _store_for(current, workers, view.store_addresses)
    if store_address is None:
        return None, "no live node of the new plan serves a rendezvous store"
    generation = current.generation + 1
    idle = [{"node": c.node, "slot": c.slot, "old_rank": c.old_rank} for c in unused if c.old_rank is not None]
    idle_why = idle_reason(spec, current, len(survivors) + len(spares), chosen, partition=partition) if idle else ""
    reason = (f"{cause}: dp={current.dp}·pp={current.pp} ({current.world_size} workers) -> "
              f"dp={dp}·pp={pp} ({len(workers)} workers)"
              + ("" if pp == current.pp else f", layers re-partitioned {list(current.layer_partition)} -> {list(bounds)}")
              + (f", {len(idle)} survivor(s) idle: {idle_why}" if idle else ""))
    plan = new_plan(
        job_id=current.job_id,
        generation=generation,
        placement=[(c.node, c.slot) for _, c in ranked],
        dp=dp,
        pp=pp,
        zero_stage=current.zero_stage,
        layer_partition=bounds,
        global_batch_size=spec.global_batch_size,
        store_address=store_address,
        switch_at_step=switch_at_step,
        reason=reason,
        extra={
            "cause": cause,
            "planned_at": now,
            "previous_generation": current.generation,
            # new rank -> rank in the previous generation (survivors only): the
            # resharding planner reads where each slice used to live from this.
            "previous_ranks": {str(r): c.old_rank for r, c in placed.items() if c.old_rank is not None},
            "idle": idle,
            "idle_reason": idle_why,
            # the new metrics rank first, then the others in rank order, then the idle
            "metrics_backfill": metrics_backfill(
                current, sorted((c for _, c in ranked), key=lambda c: c is not placed[pp - 1]) + list(unused),
                switch_at_step),
            "layout": {"why": why, "expected_throughput": round(float(chosen.throughput), 4),
                       "bubble": round(chosen.bubble, 4)},
        },
    )
    return plan, reason


def metrics_backfill(current: Plan, kept: Sequence[Candidate], switch_at_step: int) -> dict[str, Any] | None:
    """The survivor that re-sends its recent step records to the job's metrics, or None.

    Only the metrics rank's records become the job's metrics, and its agent relays them about
    once a second: a failure that takes that rank (its node lost, the process killed) loses the
    steps it finished since the last relay, and a resumed generation does not redo them. Every
    rank's step record carries the same all-reduced loss, so a survivor that trained those
    steps can send its own (the agent keeps a few hundred, agent/progress.py). Chosen: the first
    survivor of ``kept`` (the new metrics rank, the others in rank order, then the idle
    survivors). None when the metrics
    rank lives on, for a planned switch (its worker relays all it wrote before it retires),
    or when nobody survived."""
    old = current.metrics_worker()
    if switch_at_step >= 0 or old is None:
        return None
    survivors = [c for c in kept if c.old_rank is not None]
    if any((c.node, c.slot) == (old.node, old.slot) for c in survivors) or not survivors:
        return None
    return {"node": survivors[0].node, "slot": survivors[0].slot}


def _spare_candidates(view: ClusterView, *, exclude_nodes: Iterable[str]) -> list[Candidate]:
    excluded = set(exclude_nodes)
    return [
        Candidate(node=node, slot=slot)
        for node in sorted(view.free_slots)
        if node not in excluded
        for slot in sorted(view.free_slots[node])
    ]


def _store_for(current: Plan, workers: Sequence[WorkerAssignment], addresses: Mapping[str, str]) -> str | None:
    """Keep the current store if its node is still live; else the store of rank 0's node."""
    if current.store_address in addresses.values():
        return current.store_address
    for w in sorted(workers, key=lambda w: w.rank):
        if w.node in addresses:
            return addresses[w.node]
    return None
