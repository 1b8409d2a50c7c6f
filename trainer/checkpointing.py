"""Activation checkpointing (``model.activation_checkpointing``): trade compute for activation
memory, applied to a stage's blocks without changing the model or its parameter names.

* ``none``: keep every activation (default).
* ``full``: keep only each block's input; the whole block runs again in backward.
* ``selective``: keep the outputs of the matrix products and of attention (expensive to
  recompute), recompute the rest in backward (LayerNorm, GELU, dropout masks, residual adds,
  cheap but as large as a product's output): torch's selective checkpoint policy.

World invariance: the recomputed forward draws the same dropout masks, because KeyedDropout
seeds a generator from (seed, step, sample position, layer, site) on every call, never from a
global RNG state (trainer.model); so a job's losses are the same with or without
checkpointing, and in every layout.

The checkpointed call wraps ``block.forward`` on the instance, under ``torch.compile`` too
(``Block.compile()`` compiles the module call, which calls this forward): checkpointing with
``use_reentrant=False`` is traced by the compiler.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from common.spec import ACTIVATION_CHECKPOINTING

_SAVED_OPS = {
    op for op in (
        getattr(torch.ops.aten, name, None)
        for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                     "_scaled_mm")
    ) if op is not None
}
"""Ops whose outputs ``selective`` keeps (an aten op may not exist in every build)."""


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(stage: torch.nn.Module, mode: str) -> int:
    """Wrap the forward of every block of ``stage`` (``stage.blocks``) per ``mode``; returns the
    number of blocks wrapped. ValueError for an unknown mode."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}; got {mode!r}")
    if mode == "none":
        return 0
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    for block in stage.blocks.values():
        block.forward = functools.partial(_checkpointed, block.forward, extra)
    return len(stage.blocks)


def _checkpointed(forward, extra, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # evaluation: nothing to keep for a backward
        return forward(x)
    return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=False, **extra)
