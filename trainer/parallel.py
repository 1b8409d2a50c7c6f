"""The one object that owns the parallel degrees of a run and their validation.

``ParallelLayout`` answers every "who does what" question: rank <-> (dp_rank,
pp_rank) (dp-major, as in ``protos.plan``), which layers a stage owns, which
samples of the global batch a data-parallel rank takes, how they split into
micro-batches, and which contiguous slice of a stage's flat parameter vector
a ZeRO rank owns. Everything here is pure and torch-free so the controller,
tests and the elastic-recovery code can all reason about a layout they are not
running.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class ParallelLayout:
    dp: int
    """Data-parallel degree (replicas of each pipeline stage)."""
    pp: int
    """Pipeline degree (stages)."""
    zero_stage: int
    """0: replicated optimizer; 1: optimizer state sharded over dp; 2: gradients too."""
    layer_partition: tuple[int, ...]
    """pp+1 boundaries: stage s owns blocks [p[s], p[s+1])."""
    sample_shares: tuple[int, ...]
    """Samples per step of each dp rank; they sum to the global batch (samples)."""
    micro_batch_size: int
    """Samples per pipeline micro-batch (the last one of a share may be smaller)."""

    # ----------------------------------------------------------- construction
    @classmethod
    def from_plan(cls, plan, *, micro_batch_size: int) -> "ParallelLayout":
        layout = cls(
            dp=plan.dp,
            pp=plan.pp,
            zero_stage=plan.zero_stage,
            layer_partition=tuple(plan.layer_partition),
            sample_shares=tuple(plan.sample_shares),
            micro_batch_size=micro_batch_size,
        )
        return layout

    def validate(self, *, layers: int, global_batch_size: int) -> None:
        """Raise ValueError naming the problem; called once, before any process starts."""
        if self.dp < 1 or self.pp < 1:
            raise ValueError(f"dp and pp must be >= 1, got dp={self.dp} pp={self.pp}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.pp > layers:
            raise ValueError(f"pp={self.pp} is larger than the model's {layers} layers")
        p = self.layer_partition
        if len(p) != self.pp + 1 or p[0] != 0 or p[-1] != layers:
            raise ValueError(f"layer partition {list(p)} must have pp+1={self.pp + 1} boundaries from 0 to {layers}")
        if any(b <= a for a, b in zip(p, p[1:])):
            raise ValueError(f"layer partition {list(p)} must give every stage at least one layer")
        if len(self.sample_shares) != self.dp:
            raise ValueError(f"sample shares {list(self.sample_shares)} must have dp={self.dp} entries")
        if sum(self.sample_shares) != global_batch_size:
            raise ValueError(
                f"sample shares {list(self.sample_shares)} sum to {sum(self.sample_shares)}, "
                f"not the global batch size {global_batch_size}"
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {self.micro_batch_size}")
        for d, share in enumerate(self.sample_shares):
            if self.micro_batch_size > share:
                raise ValueError(
                    f"micro-batch size {self.micro_batch_size} is larger than dp rank {d}'s share of {share} samples"
                )

    # ------------------------------------------------------------- topology
    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, pp_rank) of a global rank (dp-major)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return divmod(rank, self.pp)

    def rank_of(self, dp_rank: int, pp_rank: int) -> int:
        return dp_rank * self.pp + pp_rank

    def dp_group_ranks(self, pp_rank: int) -> list[int]:
        """Global ranks holding replicas of stage ``pp_rank`` (one ZeRO group)."""
        return [self.rank_of(d, pp_rank) for d in range(self.dp)]

    def stage_layers(self, pp_rank: int) -> range:
        return range(self.layer_partition[pp_rank], self.layer_partition[pp_rank + 1])

    # ------------------------------------------------------------------ data
    def sample_range(self, dp_rank: int) -> tuple[int, int]:
        """[start, end) positions in the global batch that ``dp_rank`` trains on."""
        start = sum(self.sample_shares[:dp_rank])
        return start, start + self.sample_shares[dp_rank]

    def micro_batches(self, dp_rank: int) -> list[tuple[int, int]]:
        """Global-batch position ranges of this dp rank's micro-batches, in order."""
        start, end = self.sample_range(dp_rank)
        return [(lo, min(lo + self.micro_batch_size, end)) for lo in range(start, end, self.micro_batch_size)]

    # ------------------------------------------------------------------ ZeRO
    def shard_range(self, numel: int, dp_rank: int) -> tuple[int, int]:
        """[start, end) of a stage's flat vector of ``numel`` elements owned by
        ``dp_rank`` for the optimizer update (chunks of ceil(numel/dp), last may
        be short or empty). Used for every zero stage; with zero 0 each rank still
        updates everything, the chunk only says whose norm contribution counts."""
        chunk = padded_numel(numel, self.dp) // self.dp
        return min(dp_rank * chunk, numel), min((dp_rank + 1) * chunk, numel)

    def describe(self) -> str:
        return f"dp{self.dp}pp{self.pp}z{self.zero_stage}"


def padded_numel(numel: int, dp: int) -> int:
    """Smallest multiple of dp >= numel: collectives need equal chunks."""
    return -(-numel // dp) * dp
