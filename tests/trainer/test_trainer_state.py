"""The per-rank state hand-over the elastic-recovery work builds on."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.helpers.trainer_helpers import tiny_spec
from common.spec import JobSpec
from trainer.parallel import ParallelLayout
from trainer.sharding import owned_slices, state_layout
from trainer.train import Trainer


@pytest.fixture
def world_of_one():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_exported_state_resumes_the_same_run(world_of_one):
    spec = JobSpec.from_dict(tiny_spec(steps=5))
    layout = ParallelLayout(dp=1, pp=1, zero_stage=0, layer_partition=(0, 4), sample_shares=(12,), micro_batch_size=2)
    cpu = torch.device("cpu")
    straight = Trainer(spec, layout, 0, device=cpu)
    reference = [r["loss"] for r in straight.train(5)]

    first = Trainer(spec, layout, 0, device=cpu)
    first.train(3)
    state = first.export_state()
    assert state["committed_step"] == 3
    assert state["owned"] == owned_slices(spec.model, layout, 0)  # the pure function agrees with the trainer
    assert set(state["tensors"]) == set(state_layout(spec.model, layout)[0])
    assert set(state["owned"]) == set(dict(first.stage.named_parameters()))

    resumed = Trainer(spec, layout, 0, device=cpu)
    resumed.import_state(state)
    assert [r["loss"] for r in resumed.train(5)] == reference[3:]


@pytest.mark.timeout(60)
def test_no_copy_and_no_checkpoint_starts_over_from_the_initial_state(world_of_one, tmp_path):
    # soak (issue #16): three of four ranks lost within seconds, before the first disk
    # checkpoint; the job FAILED ("no in-memory copy and no disk checkpoint covers the new
    # layout") although step 0 is a pure function of the seed
    from trainer.checkpoints import DiskCheckpoints
    from trainer.restore import load_from_disk

    assert load_from_disk(None, {"params": [(0, 4)]}, None, 5.0) == (0, None, 0)
    disk = DiskCheckpoints.__new__(DiskCheckpoints)  # an empty checkpoint dir: nothing covers
    disk.flush = lambda timeout_s: True
    disk.steps_covering = lambda mine: []
    assert load_from_disk(disk, {"params": [(0, 4)]}, None, 5.0) == (0, None, 0)
    disk.steps_covering = lambda mine: [100, 200]
    disk.load = lambda step, mine: ({"params": "loaded"}, 16)
    assert load_from_disk(disk, {"params": [(0, 4)]}, None, 5.0) == (200, {"params": "loaded"}, 16)
