"""A GPT decoder built as stages: embedding -> blocks[lo:hi] -> final LN + head.

A pipeline stage owns a contiguous range of blocks; the first stage also owns
the embeddings and the last the final LayerNorm and the head. Parameter names
are global (``blocks.7.mlp_in.weight`` is the same name on whichever stage owns
block 7) and every parameter is initialised from a generator keyed by (seed,
name), so the model is the same whatever the layout. The GPT's head is not
tied to the embedding (the Llama's may be: trainer/llama.py, same contract).
``build_stage`` picks the architecture from ``model.arch``.

Dropout masks are drawn per sample from generators keyed by (seed, step,
sample position in the global batch, layer, site), never by rank: a sample
gets the same mask whichever rank and micro-batch it lands in.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import llama, rng
from trainer.dropout import SITE_ATTN, SITE_EMBED, SITE_MLP, EMBED_LAYER, DropoutContext, KeyedDropout

class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal SDPA attention."""

    def __init__(self, *, d_model: int, heads: int, dropout: float, layer: int):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.drop_attn = KeyedDropout(dropout, layer, SITE_ATTN)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, 4 * d_model)
        self.mlp_out = nn.Linear(4 * d_model, d_model)
        self.drop_mlp = KeyedDropout(dropout, layer, SITE_MLP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop_attn(self.attn_out(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop_mlp(self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x)))))


class GPTStage(nn.Module):
    """Blocks [first_layer, last_layer) plus the embedding (first stage) and head (last stage)."""

    def __init__(self, model_spec, *, layers: range, is_first: bool, is_last: bool):
        super().__init__()
        m = model_spec
        self.is_first, self.is_last = is_first, is_last
        if is_first:
            self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
            self.pos_emb = nn.Embedding(m.seq_len, m.d_model)
            self.drop_emb = KeyedDropout(m.dropout, EMBED_LAYER, SITE_EMBED)
        self.blocks = nn.ModuleDict(
            {str(i): Block(d_model=m.d_model, heads=m.heads, dropout=m.dropout, layer=i) for i in layers}
        )
        if is_last:
            self.ln_f = nn.LayerNorm(m.d_model)
            self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [b, t] (first stage) or hidden [b, t, d] -> hidden, or logits (last stage)."""
        if self.is_first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.drop_emb(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self.head(self.ln_f(x))
        return x

    def set_dropout_context(self, ctx: DropoutContext) -> None:
        for module in self.modules():
            if isinstance(module, KeyedDropout):
                module.context = ctx


def build_stage(model_spec, *, layers: range, is_first: bool, is_last: bool, device="cpu") -> nn.Module:
    """Build a stage of ``model_spec.arch`` on ``device`` ('meta' for shapes only); not yet initialised."""
    cls = llama.LlamaStage if model_spec.arch == "llama" else GPTStage
    with torch.device(device):
        return cls(model_spec, layers=layers, is_first=is_first, is_last=is_last)


@torch.no_grad()
def init_parameters(stage: GPTStage, *, seed: int, layers: int) -> None:
    """GPT-2 style init, each tensor from a generator keyed by (seed, its global name).

    Drawn on CPU and copied, so CPU and CUDA runs start from the same weights.
    """
    if not isinstance(stage, GPTStage):
        return llama.init_parameters(stage, seed=seed, layers=layers)
    residual_std = 0.02 / math.sqrt(2 * layers)
    for name, param in stage.named_parameters():
        gen = torch.Generator().manual_seed(rng.key(rng.INIT, seed, rng.name_key(name)))
        if name.endswith("bias"):
            value = torch.zeros(param.shape)
        elif ".ln_" in name or name.startswith("ln_"):
            value = torch.ones(param.shape)
        else:
            std = residual_std if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
            value = torch.randn(param.shape, generator=gen) * std
        param.copy_(value)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (incl. embeddings), not to biases or LayerNorms."""
    return param.dim() >= 2


_SHAPES: dict[tuple, tuple[tuple[str, tuple[int, ...]], ...]] = {}
"""stage_param_shapes results by (spec, layers, first, last): the layout math of a recovery asks
for the same few stages many times, and each meta build costs ~10-20 ms on a busy host."""


def stage_param_shapes(model_spec, *, layers: range, is_first: bool, is_last: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(global name, shape) of a stage's parameters in flat-buffer order, without allocating (memoised)."""
    key = (repr(model_spec), layers.start, layers.stop, layers.step, is_first, is_last)
    shapes = _SHAPES.get(key)
    if shapes is None:
        stage = build_stage(model_spec, layers=layers, is_first=is_first, is_last=is_last, device="meta")
        shapes = _SHAPES[key] = tuple((name, tuple(p.shape)) for name, p in stage.named_parameters())
    return list(shapes)
