"""Flat parameter/gradient buffers, the ZeRO-sharded AdamW, and the LR schedule.

A stage's parameters become views into one flat fp32 buffer (and their
gradients into another), padded to a multiple of dp so ZeRO collectives work on
equal chunks. The optimizer updates one contiguous range of the flat vector:
everything with zero 0, this rank's chunk with zero 1/2 (then all-gathers).
Its state (exp_avg, exp_avg_sq, step) covers exactly that range, which is what
``export_state``/``import_state`` hand over as {param name: flat slice}.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.model import decays
from trainer.parallel import padded_numel


class FlatStage:
    """One stage's parameters and gradients as views of two flat, padded fp32 buffers."""

    def __init__(self, module: nn.Module, *, dp: int, device: torch.device, grad_buffer: bool = True):
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.numel = sum(p.numel() for _, p in named)
        self.padded = padded_numel(self.numel, dp)
        self.params = torch.zeros(self.padded, device=device, dtype=torch.float32)
        # ZeRO-2 keeps no full gradient (trainer.zero2); everything else accumulates here.
        self.grads = torch.zeros(self.padded if grad_buffer else 0, device=device, dtype=torch.float32)
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, p in named:
            n = p.numel()
            self.offsets[name] = (offset, offset + n)
            # (values are set afterwards by init_parameters or import_state)
            # Views: optimizer updates and all-gathers land in the module directly,
            # and autograd accumulates straight into the flat gradient buffer.
            p.data = self.params[offset : offset + n].view_as(p)
            if grad_buffer:
                p.grad = self.grads[offset : offset + n].view_as(p)
            offset += n
        self._decay_flags = [(self.offsets[n], decays(n, p)) for n, p in named]

    def zero_grad(self) -> None:
        self.grads.zero_()

    def decay_spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """[a, b) ranges, relative to lo, of flat [lo, hi) where weight decay applies."""
        spans = []
        for (a, b), flag in self._decay_flags:
            if flag and a < hi and b > lo:
                spans.append((max(a, lo) - lo, min(b, hi) - lo))
        return spans

    def slices_of(self, lo: int, hi: int) -> dict[str, tuple[int, int]]:
        """{name: (start, end) within that parameter's flattened tensor} covering flat [lo, hi)."""
        return flat_range_to_slices(self.offsets, lo, hi)


def _complement(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The [a, b) ranges of [0, n) that no span of the sorted, disjoint ``spans`` covers."""
    out, at = [], 0
    for a, b in spans:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < n:
        out.append((at, n))
    return out


def flat_range_to_slices(offsets: dict[str, tuple[int, int]], lo: int, hi: int) -> dict[str, tuple[int, int]]:
    out = {}
    for name, (a, b) in offsets.items():
        if a < hi and b > lo:
            out[name] = (max(a, lo) - a, min(b, hi) - a)
    return out


class ShardedAdamW:
    """AdamW (decoupled decay, fp32 state) over the flat range [lo, hi) of a FlatStage.

    The update is PyTorch's fused AdamW kernel (``torch._fused_adamw_``, CPU and CUDA) over
    views of the flat buffers: one pass over params, gradients and moments instead of one pass
    per elementwise op (at 1.35B parameters on an H100 the op-by-op update cost ~7% of a step).
    The kernel is elementwise, so how the range is cut into views (layout, ZeRO shard) does not
    change any element's result."""

    def __init__(self, flat: FlatStage, lo: int, hi: int, opt_spec):
        self.flat, self.lo, self.hi, self.spec = flat, lo, hi, opt_spec
        device = flat.params.device
        self.exp_avg = torch.zeros(hi - lo, device=device)
        self.exp_avg_sq = torch.zeros(hi - lo, device=device)
        self.decay_spans = flat.decay_spans(lo, hi)
        self.plain_spans = _complement(self.decay_spans, hi - lo)
        """[a, b) ranges (relative to lo) without weight decay: the rest of the owned range."""
        self.steps_taken = 0
        self._step_tensor = torch.zeros((), device=device, dtype=torch.float32)
        """The kernel reads the step count (bias corrections) from a tensor on the device."""

    @property
    def state_bytes(self) -> int:
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: float) -> None:
        """``grad`` covers [lo, hi) and is already averaged and clipped."""
        s = self.spec
        self.steps_taken += 1
        self._step_tensor.fill_(float(self.steps_taken))
        param = self.flat.params[self.lo : self.hi]
        for spans, decay in ((self.decay_spans, s.weight_decay), (self.plain_spans, 0.0)):
            if not spans:
                continue
            torch._fused_adamw_(
                [param[a:b] for a, b in spans], [grad[a:b] for a, b in spans],
                [self.exp_avg[a:b] for a, b in spans], [self.exp_avg_sq[a:b] for a, b in spans], [],
                [self._step_tensor] * len(spans),
                lr=lr, beta1=s.beta1, beta2=s.beta2, weight_decay=decay, eps=s.eps, amsgrad=False, maximize=False,
            )

    # ------------------------------------------------ elastic state hand-over
    def state_views(self) -> dict[str, torch.Tensor]:
        """Live views of the owned state, keyed ``"{kind}/{param name}"`` with kind in
        STATE_KINDS; each is the flat slice ``owned[name]`` of that tensor. No copy:
        a snapshotter copies them; writing into them restores state."""
        views = {}
        buffers = {"param": self.flat.params[self.lo : self.hi], "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        for name, (a, b) in self.flat.slices_of(self.lo, self.hi).items():
            base = self.flat.offsets[name][0] + a - self.lo
            for kind in STATE_KINDS:
                views[state_key(kind, name)] = buffers[kind][base : base + (b - a)]
        return views

    def export_state(self) -> dict:
        """{"step", "owned": {name: (start, end)}, "tensors": {"kind/name": flat slice copy}}."""
        return {
            "step": self.steps_taken,
            "owned": self.flat.slices_of(self.lo, self.hi),
            "tensors": {key: view.detach().clone() for key, view in self.state_views().items()},
        }

    @torch.no_grad()
    def import_state(self, state: dict) -> None:
        """Load the owned slices (the ownership of this layout, e.g. after a reshard)."""
        views = self.state_views()
        missing = sorted(set(views) - set(state["tensors"]))
        if missing:
            raise ValueError(f"imported state lacks {len(missing)} owned slices, e.g. {missing[0]}")
        for key, view in views.items():
            source = state["tensors"][key]
            if source.numel() != view.numel():
                raise ValueError(f"{key}: imported slice has {source.numel()} elements, this rank owns {view.numel()}")
            view.copy_(source.reshape(-1))
        self.steps_taken = int(state["step"])


STATE_KINDS = ("param", "exp_avg", "exp_avg_sq")
"""Per-parameter state a rank owns: fp32 master weights and the two AdamW moments."""


def state_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def lr_at(step: int, opt_spec, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr`` at ``total_steps``.

    ``step`` is 0-based (the step about to be applied).
    """
    s = opt_spec
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))
