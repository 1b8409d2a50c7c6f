"""Dropout that is a pure function of (seed, step, sample position, layer, site), shared by
every architecture (trainer/model.py, trainer/llama.py).

Masks are drawn per sample from generators keyed by those, never by rank: a sample gets the
same mask whichever rank and micro-batch it lands in, so training is world-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer import rng

EMBED_LAYER = -1  # dropout "layer" id of the embedding output
SITE_ATTN, SITE_MLP, SITE_EMBED = 0, 1, 2


@dataclass
class DropoutContext:
    """What the masks of the current forward are keyed by."""

    seed: int
    step: int
    positions: list[int]
    """Global-batch position of each sample of the micro-batch."""


class KeyedDropout(nn.Module):
    """Dropout whose mask for sample i depends only on (seed, step, position i, layer, site)."""

    def __init__(self, p: float, layer: int, site: int):
        super().__init__()
        self.p, self.layer, self.site = p, layer, site
        self.context: DropoutContext | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        ctx = self.context
        if ctx is None or len(ctx.positions) != x.shape[0]:
            raise RuntimeError("KeyedDropout needs a DropoutContext matching the micro-batch")
        keep = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        gen = torch.Generator(device=x.device)
        for i, pos in enumerate(ctx.positions):
            gen.manual_seed(rng.key(rng.DROPOUT, ctx.seed, ctx.step, pos, self.layer, self.site))
            keep[i].uniform_(generator=gen)
        mask = (keep >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))
        return x * mask
