"""Pure pieces of the trainer: partitioning, schedule, data order, keyed dropout, sharding, the
recovery record."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from common.spec import ModelSpec
from protos.recovery import RecoveryRecord
from trainer.data import StepSampler, SyntheticTokens
from trainer.dropout import DropoutContext, KeyedDropout
from trainer.model import build_stage, init_parameters
from trainer.parallel import ParallelLayout
from trainer.restore import Restored, Resume, recovery_record
from common.layout import even_shares
from common.layout import balance_layers, partition_for_model, partition_for_spec
from trainer.schedule import one_f_one_b
from trainer.sharding import owned_slices, stage_offsets

MODEL = ModelSpec(layers=4, d_model=32, heads=2, vocab_size=64, seq_len=16, dropout=0.1)


def layout(dp, pp, zero, shares=None, mb=2, model=MODEL, batch=12):
    return ParallelLayout(dp=dp, pp=pp, zero_stage=zero, layer_partition=partition_for_spec(model, pp),
                          sample_shares=tuple(shares or even_shares(batch, dp)), micro_batch_size=mb)


def test_partition_balances_cost_not_count():
    assert balance_layers([1.0] * 4, 2) == (0, 2, 4)
    # a head worth two blocks pushes layers away from the last stage
    assert balance_layers([1.0] * 8, 2, last_extra=2.0) == (0, 5, 8)
    # tiny embedding/head: an even split
    assert partition_for_model(layers=8, d_model=64, seq_len=32, vocab_size=256, pp=4) == (0, 2, 4, 6, 8)
    # 50k vocabulary: the last stage gets the fewest blocks
    bounds = partition_for_model(layers=12, d_model=256, seq_len=128, vocab_size=50_000, pp=3)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sizes[-1] < sizes[0] and sum(sizes) == 12 and min(sizes) >= 1
    with pytest.raises(ValueError, match="cannot each own a layer"):
        balance_layers([1.0] * 2, 3)


@pytest.mark.parametrize("pp, micro", [(1, 3), (2, 5), (4, 6), (4, 2)])
def test_one_f_one_b_is_complete_and_bounded(pp, micro):
    for stage in range(pp):
        actions = one_f_one_b(micro, pp, stage)
        assert sorted(i for k, i in actions if k == "F") == list(range(micro))
        assert [i for k, i in actions if k == "B"] == list(range(micro))
        live = peak = 0
        for kind, i in actions:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
            if kind == "B":
                assert ("F", i) in actions[: actions.index((kind, i))]
        assert peak <= min(pp - stage, micro)  # 1F1B's activation bound


def test_step_samples_do_not_depend_on_the_split():
    data = SyntheticTokens(num_samples=50, seq_len=8, vocab_size=64, seed=3)
    sampler = StepSampler(data, global_batch_size=12, seed=3)
    whole = sampler.batch_tokens(5, range(0, 12))
    parts = torch.cat([sampler.batch_tokens(5, range(0, 7)), sampler.batch_tokens(5, range(7, 12))])
    assert torch.equal(whole, parts)
    # an epoch visits every sample once, across step boundaries
    seen = [sampler.sample_index(s, p) for s in range(5) for p in range(12)][:50]
    assert sorted(seen) == list(range(50))


def test_dropout_mask_is_keyed_by_sample_not_by_batch_position():
    drop = KeyedDropout(0.5, layer=2, site=0)
    x = torch.ones(4, 3, 5)
    drop.context = DropoutContext(seed=1, step=7, positions=[0, 1, 2, 3])
    full = drop(x)
    drop.context = DropoutContext(seed=1, step=7, positions=[2, 3])
    assert torch.equal(drop(x[:2]), full[2:])
    drop.context = DropoutContext(seed=1, step=8, positions=[0, 1, 2, 3])
    assert not torch.equal(drop(x), full)  # a new step draws new masks
    assert 0.2 < (full == 0).float().mean() < 0.8


def test_init_is_the_same_whatever_the_stage_split():
    whole = build_stage(MODEL, layers=range(0, 4), is_first=True, is_last=True)
    init_parameters(whole, seed=5, layers=4)
    tail = build_stage(MODEL, layers=range(2, 4), is_first=False, is_last=True)
    init_parameters(tail, seed=5, layers=4)
    ref = dict(whole.named_parameters())
    for name, p in tail.named_parameters():
        assert torch.equal(p, ref[name]), name


@pytest.mark.parametrize("dp, pp, zero", [(1, 1, 0), (2, 2, 0), (4, 1, 1), (2, 2, 2), (3, 1, 2)])
def test_owned_slices_cover_each_stage_exactly(dp, pp, zero):
    lay = layout(dp, pp, zero)
    for pp_rank in range(pp):
        offsets = stage_offsets(MODEL, lay, pp_rank)
        counts = {name: torch.zeros(b - a, dtype=torch.int32) for name, (a, b) in offsets.items()}
        for dp_rank in range(dp):
            for name, (a, b) in owned_slices(MODEL, lay, lay.rank_of(dp_rank, pp_rank)).items():
                counts[name][a:b] += 1
        expected = 1 if zero else dp  # zero >= 1: disjoint shards; zero 0: replicated
        assert all(bool((c == expected).all()) for c in counts.values())


def test_layout_validation_names_the_problem():
    with pytest.raises(ValueError, match="larger than the model's 4 layers"):
        ParallelLayout(dp=1, pp=5, zero_stage=0, layer_partition=(0, 1, 2, 3, 4, 5), sample_shares=(12,),
                       micro_batch_size=2).validate(layers=4, global_batch_size=12)
    with pytest.raises(ValueError, match="larger than dp rank 1's share"):
        layout(2, 1, 0, shares=[11, 1]).validate(layers=4, global_batch_size=12)
    with pytest.raises(ValueError, match="sum to 10"):
        layout(2, 1, 0, shares=[5, 5]).validate(layers=4, global_batch_size=12)
    assert layout(2, 2, 1).micro_batches(1) == [(6, 8), (8, 10), (10, 12)]
    assert layout(2, 1, 0, shares=[7, 5]).micro_batches(0)[-1] == (6, 7)


def test_synthetic_samples_follow_the_successor_rule_exactly():
    """The walk: every non-noise token is perm[previous token]; noise is ~10%; samples are a
    function of (seed, index) only."""
    ds = SyntheticTokens(num_samples=64, seq_len=200, vocab_size=50, seed=11)
    perm = ds._successor().tolist()
    follows = total = 0
    for index in range(8):
        tokens = ds.sample(index).tolist()
        assert tokens == ds.sample(index).tolist() and len(tokens) == 201
        assert all(0 <= t < 50 for t in tokens)
        follows += sum(b == perm[a] for a, b in zip(tokens, tokens[1:]))
        total += len(tokens) - 1
    assert 0.85 < follows / total < 0.97  # 10% noise, a few of which land on the successor anyway
    assert ds.sample(0).tolist() != SyntheticTokens(num_samples=64, seq_len=200, vocab_size=50, seed=12).sample(0).tolist()


def test_backend_override_names_a_bad_value(monkeypatch):
    from trainer.train import backend_for

    assert backend_for(torch.device("cpu")) == "gloo"
    # CUDA: NCCL for the tensors, and gloo for the runtime's CPU gathers (a pure NCCL group refuses them)
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv("TENAX_BACKEND", "gloo")
    assert backend_for(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv("TENAX_BACKEND", "mpi")
    with pytest.raises(ValueError, match="TENAX_BACKEND"):
        backend_for(torch.device("cpu"))


def test_recovery_record_carries_every_phase_including_the_gpu_wait():
    """One place builds the record: the GPU wait and the rebuild are arguments, the transfer
    comes from the restore, the total from the first notice."""
    new = layout(1, 2, 0)
    trainer = SimpleNamespace(generation=5, layout=new, rank=1)
    resume = Resume(cause="peer_lost", reason="rank 3 died", noticed=time.monotonic() - 2.0, noticed_time=1.0e9,
                    plan_wait_s=0.4, old_generation=4, old_layout="dp2 pp2", at_step=30)
    restored = Restored(step=28, at_step=30, received=2_000_000_000, network_s=1.0, transfer_s=1.2)
    record = recovery_record(trainer, restored, resume, 0.3, 1.234567)
    assert (record.gpu_wait_s, record.rebuild_s, record.transfer_s, record.plan_wait_s) == (1.2346, 0.3, 1.2, 0.4)
    assert (record.new_generation, record.new_layout, record.rank) == (5, new.describe(), 1)
    assert (record.resumed_step, record.steps_lost, record.network_gbps) == (28, 2, 2.0)
    assert 2.0 <= record.total_s < 60
    assert RecoveryRecord.from_dict(record.to_dict()) == record
