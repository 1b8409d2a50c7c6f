"""Activation checkpointing (issue 15): the same per-step losses with and without it (the
recomputed forward draws the same keyed dropout masks), in one process and in a pipeline."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from common.spec import JobSpec, SpecError
from tests.helpers.trainer_helpers import tiny_spec
from trainer.checkpointing import apply_activation_checkpointing
from trainer.parallel import ParallelLayout
from trainer.train import Trainer


@pytest.fixture
def world_of_one():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


_REFERENCE: list[float] = []
"""Losses without checkpointing, computed once for the module."""


def _run(mode: str, steps: int = 3) -> tuple[list[float], Trainer]:
    raw = tiny_spec(steps=steps, global_batch_size=4)  # 2 micro-batches a step: fast under load
    raw["model"] = {**raw["model"], "dropout": 0.2, "activation_checkpointing": mode}
    spec = JobSpec.from_dict(raw)
    layout = ParallelLayout(dp=1, pp=1, zero_stage=0, layer_partition=(0, spec.model.layers), sample_shares=(4,),
                            micro_batch_size=2)
    trainer = Trainer(spec, layout, 0, device=torch.device("cpu"))
    return [r["loss"] for r in trainer.train(steps)], trainer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_losses_as_without(world_of_one, mode):
    if not _REFERENCE:
        _REFERENCE.extend(_run("none")[0])
    reference = _REFERENCE
    losses, trainer = _run(mode)
    assert all(isinstance(b.forward, __import__("functools").partial) for b in trainer.stage.blocks.values())
    for step, (a, b) in enumerate(zip(losses, reference), 1):
        assert math.isclose(a, b, rel_tol=1e-5), (mode, step, a, b)


def test_checkpointing_recomputes_in_backward():
    """The wrapped block runs its forward again in backward (full), and keeps fewer tensors."""
    from trainer.model import Block

    calls = {"n": 0}
    block = Block(d_model=16, heads=2, dropout=0.0, layer=0)
    inner = block.forward

    def counting(x):
        calls["n"] += 1
        return inner(x)
    block.forward = counting
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleDict({"0": block})
    assert apply_activation_checkpointing(holder, "full") == 1
    x = torch.randn(2, 8, 16, requires_grad=True)
    block(x).sum().backward()
    assert calls["n"] == 2 and x.grad is not None


def test_an_unknown_mode_names_the_field():
    with pytest.raises(SpecError, match="model.activation_checkpointing"):
        JobSpec.from_dict({"model": {"activation_checkpointing": "some"}})
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing(torch.nn.Module(), "some")
