"""A Llama decoder built as stages: token embedding -> blocks[lo:hi] -> final RMSNorm + head.

Same contract as trainer.model's GPT: a pipeline stage owns a contiguous range
of blocks, parameters are named globally (``blocks.7.gate.weight`` on whichever
stage owns block 7) and initialised from generators keyed by (seed, name), and
dropout masks are keyed by (seed, step, sample, layer, site). The math follows
Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary embeddings, RMSNorm in
fp32, SwiGLU, grouped-query attention, no biases), so its checkpoints load by a
renaming only (trainer.hf).

Tied embeddings (``model.tie_embeddings``): the head keeps its own parameter
``head.weight`` in every layout, initialised equal to ``tok_emb.weight``; each
step the two gradients are summed (``TiedEmbeddings``), so both copies take the
same update and stay equal. On one stage the sum is local; across stages it is
one all-reduce between the first and last stage of each replica. Keeping the
copy in every layout keeps the state's names the same whatever the pipeline
split, so resharding needs nothing special.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import rng
from trainer.dropout import EMBED_LAYER, SITE_ATTN, SITE_EMBED, SITE_MLP, DropoutContext, KeyedDropout

TIED_HEAD, TIED_EMBEDDING = "head.weight", "tok_emb.weight"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim] of the rotate-half convention (fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, m, *, layer: int):
        super().__init__()
        self.heads, self.kv_heads = m.heads, m.n_kv_heads
        self.head_dim = m.d_model // m.heads
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.q = nn.Linear(m.d_model, m.heads * self.head_dim, bias=False)
        self.k = nn.Linear(m.d_model, self.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(m.d_model, self.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(m.heads * self.head_dim, m.d_model, bias=False)
        self.drop_attn = KeyedDropout(m.dropout, layer, SITE_ATTN)
        self.mlp_norm = RMSNorm(m.d_model, m.norm_eps)
        self.gate = nn.Linear(m.d_model, m.mlp_dim, bias=False)
        self.up = nn.Linear(m.d_model, m.mlp_dim, bias=False)
        self.down = nn.Linear(m.mlp_dim, m.d_model, bias=False)
        self.drop_mlp = KeyedDropout(m.dropout, layer, SITE_MLP)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        x = x + self.drop_attn(self.o(y.transpose(1, 2).reshape(b, t, -1)))
        h = self.mlp_norm(x)
        return x + self.drop_mlp(self.down(F.silu(self.gate(h)) * self.up(h)))


class LlamaStage(nn.Module):
    """Blocks [first_layer, last_layer) plus the embedding (first stage) and norm + head (last stage)."""

    def __init__(self, model_spec, *, layers: range, is_first: bool, is_last: bool):
        super().__init__()
        m = self.model_spec = model_spec
        self.is_first, self.is_last = is_first, is_last
        if is_first:
            self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
            self.drop_emb = KeyedDropout(m.dropout, EMBED_LAYER, SITE_EMBED)
        self.blocks = nn.ModuleDict({str(i): LlamaBlock(m, layer=i) for i in layers})
        if is_last:
            self.norm_f = RMSNorm(m.d_model, m.norm_eps)
            self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self._rope: tuple | None = None

    def _rotary(self, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < t or self._rope[0].device != device:
            m = self.model_spec
            with torch.autocast(device_type=device.type, enabled=False):  # the angles stay fp32
                self._rope = rotary_tables(max(t, m.seq_len), m.d_model // m.heads, m.rope_base, device)
        cos, sin = self._rope
        return cos[:t], sin[:t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [b, t] (first stage) or hidden [b, t, d] -> hidden, or logits (last stage)."""
        if self.is_first:
            x = self.drop_emb(self.tok_emb(x))
        cos, sin = self._rotary(x.shape[1], x.device)
        for block in self.blocks.values():
            x = block(x, cos, sin)
        if self.is_last:
            x = self.head(self.norm_f(x))
        return x

    def set_dropout_context(self, ctx: DropoutContext) -> None:
        for module in self.modules():
            if isinstance(module, KeyedDropout):
                module.context = ctx


def init_key_name(model_spec, name: str) -> str:
    """The name whose key draws ``name``'s initial value: a tied head draws the embedding's."""
    return TIED_EMBEDDING if model_spec.tie_embeddings and name == TIED_HEAD else name


@torch.no_grad()
def init_parameters(stage: LlamaStage, *, seed: int, layers: int) -> None:
    """Normal(0, 0.02) matrices (residual outputs scaled by 1/sqrt(2 layers)), unit norms;
    each tensor from a generator keyed by (seed, its global name), drawn on CPU."""
    residual_std = 0.02 / math.sqrt(2 * layers)
    for name, param in stage.named_parameters():
        key_name = init_key_name(stage.model_spec, name)
        gen = torch.Generator().manual_seed(rng.key(rng.INIT, seed, rng.name_key(key_name)))
        if name.endswith("norm.weight") or name == "norm_f.weight":
            value = torch.ones(param.shape)
        else:
            std = residual_std if name.endswith((".o.weight", ".down.weight")) else 0.02
            value = torch.randn(param.shape, generator=gen) * std
        param.copy_(value)


class TiedEmbeddings:
    """Sums the gradients of ``tok_emb.weight`` and its tied copy ``head.weight`` before the
    data-parallel reduction, and names the copy to leave out of the gradient norm.

    ``group``: the process group {first stage, last stage} of this rank's replica when they
    are different ranks (None on one stage). Every rank must build the groups in the same
    order (``new_groups``)."""

    def __init__(self, flat, *, is_first: bool, is_last: bool, group):
        self.flat, self.group = flat, group
        self.is_first, self.is_last = is_first, is_last

    @staticmethod
    def new_groups(layout, dp_rank: int):
        """Collective over the world: one {first, last} group per replica; returns this rank's."""
        import torch.distributed as dist

        mine = None
        if layout.pp == 1:
            return None
        for d in range(layout.dp):
            group = dist.new_group([layout.rank_of(d, 0), layout.rank_of(d, layout.pp - 1)])
            if d == dp_rank:
                mine = group
        return mine

    def _grad(self, name: str) -> torch.Tensor:
        a, b = self.flat.offsets[name]
        return self.flat.grads[a:b]

    def sum_gradients(self) -> None:
        if not (self.is_first or self.is_last):
            return
        if self.is_first and self.is_last:
            emb, head = self._grad(TIED_EMBEDDING), self._grad(TIED_HEAD)
            emb.add_(head)
            head.copy_(emb)
            return
        import torch.distributed as dist

        from trainer import comm

        grad = self._grad(TIED_EMBEDDING if self.is_first else TIED_HEAD)
        comm.wait(dist.all_reduce(grad, group=self.group, async_op=True), "tied embedding gradient all-reduce")

    def norm_exclusion(self, lo: int, hi: int) -> tuple[int, int] | None:
        """[a, b) relative to flat [lo, hi) holding the head copy (counted once, on the embedding)."""
        if not self.is_last:
            return None
        a, b = self.flat.offsets[TIED_HEAD]
        a, b = max(a, lo), min(b, hi)
        return (a - lo, b - lo) if a < b else None
