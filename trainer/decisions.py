"""The elastic runtime's pure decisions: my place in a plan, buddies, which step to resume
from, the snapshot interval, and where each parameter slice lives in a flat snapshot.
No I/O, no collectives: every rank derives the same answer from the same facts."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

from protos.plan import Plan
from trainer.optim import STATE_KINDS, state_key
from trainer.parallel import ParallelLayout
from trainer.reshard import Holding, plan_transfers
from trainer.sharding import stage_offsets, update_range
from common import comm_errors
from common.layout import buddy_ring, ranks_replicated_on_their_node


def error_stops_generation(text: str, *, formed: bool, aborted: bool) -> tuple[bool, str]:
    """Is an exception that is none of the interruptions (trainer/generation.py), raised while a
    generation runs, a recoverable stop (-> REFORMING) or a crash (the worker exits 1)? ``text``:
    the exception's words; ``formed``: the generation's communicators exist; ``aborted``: it was
    aborted (here, by a peer's abort key). A communication failure (common.comm_errors: a dead
    peer's closed connection, a backend timeout or NCCL error) stops it even with nobody having
    said so yet: the abort key lives in the rendezvous store, which may have gone with the
    peer's node. Pure."""
    if not formed:
        return False, "no generation formed yet"
    if aborted:
        return True, "the generation was aborted; the error followed"
    kind, evidence = comm_errors.classify(text)
    if kind != comm_errors.OTHER:
        return True, f"communication failure ({kind}): {evidence}"
    return False, "not a communication failure"


def rank_in_plan(plan: Plan, node: str, slot: int) -> int | None:
    """My rank in ``plan``: the worker placed on my (node, slot); None if I have no place."""
    for w in plan.workers:
        if w.node == node and w.slot == slot:
            return w.rank
    return None


def idle_survivors(plan: Plan) -> list[tuple[str, int]]:
    """(node, slot) of the survivors plan g+1 leaves idle (``extra["idle"]``, controller/replan.py)."""
    return [(str(i["node"]), int(i["slot"])) for i in plan.extra.get("idle", [])
            if isinstance(i, dict) and "node" in i and "slot" in i]


def buddy_and_ward(plan: Plan, rank: int) -> tuple[int, int] | None:
    """(rank I replicate to, rank whose replica I keep), on another node when possible."""
    ring = buddy_ring({w.rank: w.node for w in plan.workers})
    if not ring:
        return None
    ward = next(r for r, b in ring.items() if b == rank)
    return ring[rank], ward


LAYOUT_FIELDS = ("dp", "pp", "zero_stage", "layer_partition", "sample_shares", "micro_batch_size")


def memory_covers_node_loss(plan: Plan) -> bool:
    """Do the generation's in-memory replicas survive the loss of any one node (every rank's
    buddy on another node)?"""
    return ranks_replicated_on_their_node({w.rank: w.node for w in plan.workers}) == []


def snapshot_metadata(layout, rank: int, generation: int) -> dict[str, Any]:
    """What a flat snapshot needs to be read in any later layout: whose state it is, in which layout."""
    fields = {f: getattr(layout, f) for f in LAYOUT_FIELDS}
    fields["layer_partition"], fields["sample_shares"] = list(layout.layer_partition), list(layout.sample_shares)
    return {"layout": fields, "rank": rank, "generation": generation}


_PIECES: dict[tuple, tuple[tuple[str, str, int, int, int], ...]] = {}


def named_pieces(model_spec, metadata: Mapping[str, Any]) -> list[tuple[str, str, int, int, int]]:
    """(kind, "kind/name", start, end, offset) of every per-parameter slice in a flat snapshot:
    ``name[start:end]`` of that kind lives at ``tensors[kind][offset:offset + end - start]``.

    A snapshot is three flat tensors (the owned range of the stage's flat parameters and
    the two AdamW moments of that range): a few large copies, checksums and sends per step
    instead of three per parameter. Pieces are cut out only when a recovery needs them
    (memoised: every participant cuts every advertised copy)."""
    key = (repr(model_spec), json.dumps(metadata["layout"], sort_keys=True), int(metadata["rank"]))
    pieces = _PIECES.get(key)
    if pieces is None:
        pieces = _PIECES[key] = tuple(_cut_pieces(model_spec, metadata))
    return list(pieces)


def _cut_pieces(model_spec, metadata: Mapping[str, Any]) -> list[tuple[str, str, int, int, int]]:
    fields = dict(metadata["layout"])
    fields["layer_partition"], fields["sample_shares"] = tuple(fields["layer_partition"]), tuple(fields["sample_shares"])
    layout = ParallelLayout(**fields)
    dp_rank, pp_rank = layout.coords(int(metadata["rank"]))
    offsets = stage_offsets(model_spec, layout, pp_rank)
    lo, hi = update_range(max((b for _, b in offsets.values()), default=0), layout, dp_rank)
    pieces = []
    for name, (a, b) in offsets.items():
        if a < hi and b > lo:
            start, end = max(a, lo) - a, min(b, hi) - a
            for kind in STATE_KINDS:
                pieces.append((kind, state_key(kind, name), start, end, a + start - lo))
    return pieces


def choose_resume_step(needs: Mapping[int, Mapping[str, Sequence[tuple[int, int]]]],
                       holdings_by_step: Mapping[int, Sequence[Holding]]) -> int | None:
    """The newest step whose copies (over all participants) cover every need; None if none does."""
    for step in sorted(holdings_by_step, reverse=True):
        transfers, _ = plan_transfers(needs, holdings_by_step[step])
        if transfers is not None:
            return step
    return None


def common_disk_step(per_rank_steps: Iterable[Iterable[int]]) -> int | None:
    """The newest checkpoint step that every participant can load its part from."""
    sets = [set(s) for s in per_rank_steps]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def disk_checkpoint_due(step: int, *, every: int, last: int, memory_covers_node: bool,
                        writer_rested: bool) -> tuple[bool, str]:
    """Does the snapshot of ``step`` go to disk? Every ``every`` steps (0: never), and, while the
    in-memory replicas do not survive the loss of a node (every copy of some rank's state on
    one node, or a single worker), every snapshot the disk writer is free to take: then the
    disk is the only copy a node loss leaves. A writer that is still busy, or has not rested
    as long as its last checkpoint took (``DiskCheckpoints.rested``), skips a snapshot rather
    than queue one (the next free one is newer), so a large state is not written back to back.
    ``last``: the step last handed to the writer."""
    if every <= 0:
        return False, "disk checkpoints off"
    if step == last:
        return False, "already on its way to disk"
    if step % every == 0:
        return True, f"every {every} steps"
    if not memory_covers_node:
        if writer_rested:
            return True, "memory does not survive a node loss: every snapshot the writer can take"
        return False, "memory does not survive a node loss, but the writer is busy or resting"
    return False, "memory covers a node loss"


SNAPSHOT_OVERHEAD_BUDGET = 0.02
"""Share of the step time that snapshots may cost on average under ``snapshot_every: auto``
(the issue's target is 3 %; 2 % leaves room for the noise of one probe)."""

MAX_AUTO_INTERVAL = 64
"""Longest interval ``auto`` picks (steps): a noisy probe must not leave a job almost
without in-memory copies."""

PROBE_STEPS = 4
"""``auto`` measures the first PROBE_STEPS steps of every generation (its layout's own
times): snapshots after the first (the generation's first replication round carries it)
and the second (its copy overlaps the third step), none after the third (the fourth
step runs clean), one after the fourth; then it decides."""

PROBE_OVERLAPPED, PROBE_CLEAN = 3, 4
"""Offsets (steps into the generation) of the probe's step that overlaps a snapshot copy
and of its step that does not."""


def probe_snapshot_due(offset: int) -> bool:
    """During the probe: is a snapshot due after the step ``offset`` steps into the generation?"""
    return offset in (1, 2, PROBE_STEPS)


def auto_snapshot_interval(copy_s: float, step_s: float, replication_wait_s: float = 0.0, stall_s: float = 0.0,
                           budget: float = SNAPSHOT_OVERHEAD_BUDGET) -> int:
    """Smallest interval (steps) whose snapshots stay hidden, from measured times (seconds):

    * ``copy_s``: one snapshot's copy and checksums, from begin() to complete: the next
      snapshot must not start before it is done (it would be skipped);
    * ``replication_wait_s``: a replication round that held a boundary this long (it was
      not done one step after it started) takes about a step plus that;
    * ``stall_s``: what one snapshot costs the training thread: the boundary's own wall
      time plus how much longer the step that overlaps the copy ran than a clean step
      (memory bandwidth, the fence, the GIL). Spread over the interval it must stay within
      ``budget`` of the step time.

    ``step_s``: a clean step. Capped at MAX_AUTO_INTERVAL."""
    if step_s <= 0:
        return 1
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    hidden = math.ceil(copy_s / step_s)
    replication = math.ceil((step_s + replication_wait_s) / step_s)
    overhead = math.ceil(max(0.0, stall_s) / (budget * step_s))
    return min(MAX_AUTO_INTERVAL, max(1, hidden, replication, overhead))


def steps_lost(at_step: int, resumed_step: int) -> int:
    return max(0, at_step - resumed_step)

