"""Pure answers to "which slices of which parameters does rank r hold in layout L".

The elastic-recovery work builds its transfer plans on these: for an old and a
new layout, intersect ``owned_slices`` of the new rank with those of the old
ranks to know who sends what. They instantiate nothing (meta-device shapes).
"""

from __future__ import annotations

from trainer.model import stage_param_shapes
from trainer.optim import STATE_KINDS, flat_range_to_slices, state_key
from trainer.parallel import ParallelLayout


def stage_offsets(model_spec, layout: ParallelLayout, pp_rank: int) -> dict[str, tuple[int, int]]:
    """{name: (start, end)} of each parameter in stage ``pp_rank``'s flat vector."""
    shapes = stage_param_shapes(
        model_spec, layers=layout.stage_layers(pp_rank), is_first=pp_rank == 0, is_last=pp_rank == layout.pp - 1
    )
    offsets, offset = {}, 0
    for name, shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        offsets[name] = (offset, offset + n)
        offset += n
    return offsets


def update_range(numel: int, layout: ParallelLayout, dp_rank: int) -> tuple[int, int]:
    """Flat range whose optimizer state this rank holds: all of it with zero 0, its chunk otherwise."""
    if layout.zero_stage == 0:
        return 0, numel
    return layout.shard_range(numel, dp_rank)


def owned_slices(model_spec, layout: ParallelLayout, rank: int) -> dict[str, tuple[int, int]]:
    """{param name: (start, end) of its flattened tensor} of optimizer state held by ``rank``.

    Every rank of a stage holds that stage's full parameters; with zero >= 1 the
    optimizer state (and the authoritative copy for snapshots) is split into
    disjoint contiguous chunks over the stage's dp group.
    """
    dp_rank, pp_rank = layout.coords(rank)
    offsets = stage_offsets(model_spec, layout, pp_rank)
    numel = max(b for _, b in offsets.values())
    lo, hi = update_range(numel, layout, dp_rank)
    return flat_range_to_slices(offsets, lo, hi)


def held_params(model_spec, layout: ParallelLayout, rank: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the parameters ``rank`` holds (its stage's)."""
    _, pp_rank = layout.coords(rank)
    return dict(
        stage_param_shapes(
            model_spec, layers=layout.stage_layers(pp_rank), is_first=pp_rank == 0, is_last=pp_rank == layout.pp - 1
        )
    )


def state_layout(model_spec, layout: ParallelLayout) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """{rank: {"kind/name": [(start, end)]}} of the state every rank owns in ``layout``
    (kinds: STATE_KINDS), i.e. what ``Trainer.state_views()`` returns on each rank.
    For a new layout this is what each rank needs; for the old one, what it held
    (the ``Layout`` shape that trainer.reshard.plan_transfers takes)."""
    out = {}
    for rank in range(layout.world_size):
        owned = owned_slices(model_spec, layout, rank)
        out[rank] = {state_key(kind, name): [span] for name, span in owned.items() for kind in STATE_KINDS}
    return out
