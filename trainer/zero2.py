"""ZeRO-2 gradient path: never hold a full gradient of the stage.

With zero 0/1 autograd accumulates every micro-batch into one full flat
gradient buffer. With zero 2 each parameter's gradient is copied, as soon as
autograd has produced it, into a small bucket; a full bucket is reduced
straight to the dp ranks owning its elements (``dist.reduce`` per owner: the
ownership chunks are contiguous, so a bucket touches one or two owners) and
added into this rank's gradient shard. The parameter's gradient is then freed.
This costs one reduction per micro-batch (as in DeepSpeed's ZeRO-2) and saves
the (dp-1)/dp of the fp32 gradient memory.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from trainer import comm
from trainer.optim import FlatStage


class ShardedGradReducer:
    """Reduces gradients bucket by bucket into ``shard`` = grad of flat [lo, hi) summed over dp."""

    def __init__(self, flat: FlatStage, module: torch.nn.Module, *, lo: int, hi: int, dp_ranks: list[int],
                 chunk: int, group, bucket_numel: int):
        self.flat, self.lo, self.hi, self.group = flat, lo, hi, group
        self.dp_ranks, self.chunk = dp_ranks, chunk
        self.my_dp = dp_ranks.index(dist.get_rank())
        self.shard = torch.zeros(hi - lo, device=flat.params.device)
        self.buckets = self._make_buckets(bucket_numel)
        self._bucket_of = {name: i for i, b in enumerate(self.buckets) for name in b["names"]}
        self._staging: dict[int, torch.Tensor] = {}
        self._ready: dict[int, int] = {}
        self.comm_seconds = 0.0
        for name, param in module.named_parameters():
            param.grad = None  # no view into a full gradient buffer
            param.register_post_accumulate_grad_hook(self._hook(name))

    def _make_buckets(self, bucket_numel: int) -> list[dict]:
        """Contiguous flat ranges of whole parameters, in reverse order (the order backward produces them)."""
        buckets, current = [], None
        for name in reversed(self.flat.names):
            a, b = self.flat.offsets[name]
            if current is None or current["lo"] - a + (current["hi"] - current["lo"]) > bucket_numel:
                current = {"names": [], "lo": a, "hi": b}
                buckets.append(current)
            current["names"].append(name)
            current["lo"] = a
        return buckets

    def _hook(self, name: str):
        def on_grad(param: torch.Tensor) -> None:
            index = self._bucket_of[name]
            bucket = self.buckets[index]
            if index not in self._staging:
                self._staging[index] = torch.empty(bucket["hi"] - bucket["lo"], device=param.device)
                self._ready[index] = 0
            a, b = self.flat.offsets[name]
            self._staging[index][a - bucket["lo"] : b - bucket["lo"]].copy_(param.grad.reshape(-1))
            param.grad = None
            self._ready[index] += 1
            if self._ready[index] == len(bucket["names"]):
                self._reduce_bucket(index)
        return on_grad

    def _reduce_bucket(self, index: int) -> None:
        start = time.perf_counter()
        bucket, staging = self.buckets[index], self._staging.pop(index)
        self._ready.pop(index, None)
        first_owner, last_owner = bucket["lo"] // self.chunk, (bucket["hi"] - 1) // self.chunk
        for owner in range(first_owner, last_owner + 1):
            a, b = max(bucket["lo"], owner * self.chunk), min(bucket["hi"], (owner + 1) * self.chunk)
            piece = staging[a - bucket["lo"] : b - bucket["lo"]]
            comm.wait(dist.reduce(piece, dst=self.dp_ranks[owner], group=self.group, async_op=True), "gradient reduce")
            if owner == self.my_dp:
                self.shard[a - self.lo : b - self.lo] += piece
        self.comm_seconds += time.perf_counter() - start

    def zero_grad(self) -> None:
        self.shard.zero_()
        self.comm_seconds = 0.0

    def finish(self, extra_rounds: int) -> torch.Tensor:
        """Complete the step; ``extra_rounds`` all-zero rounds keep the collectives of
        dp ranks with fewer micro-batches (uneven shares) matched with the others'."""
        for _ in range(extra_rounds):
            for index, bucket in enumerate(self.buckets):
                self._staging[index] = torch.zeros(bucket["hi"] - bucket["lo"], device=self.shard.device)
                self._reduce_bucket(index)
        if self._staging:
            raise RuntimeError(f"buckets {sorted(self._staging)} never became complete: a parameter got no gradient")
        return self.shard
