"""trainer.snapshot: asynchronous, double-buffered, checksummed host snapshots."""

from __future__ import annotations

import threading

import pytest
import torch

from trainer.snapshot import Snapshotter, checksum, corrupt


def make_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(1000, generator=g),
        "exp_avg/w": torch.randn(1000, generator=g),
        "step": torch.tensor([step], dtype=torch.int64),
        "half": torch.randn(37, generator=g).to(torch.bfloat16),
    }


def test_a_snapshot_copies_every_tensor_and_verifies():
    state = make_state(3)
    snap = Snapshotter().take(3, state, {"generation": 2})
    assert snap.step == 3 and snap.complete and snap.metadata == {"generation": 2, "step": 3}
    for name, t in state.items():
        assert torch.equal(snap.tensors[name], t.reshape(-1))
        assert snap.tensors[name].data_ptr() != t.data_ptr()
    assert snap.verify() == []


def test_a_flipped_byte_is_caught_by_verify():
    snap = Snapshotter().take(1, make_state(1))
    corrupt(snap, "exp_avg/w", offset=123)
    assert snap.verify() == ["exp_avg/w"]
    corrupt(snap, "exp_avg/w", offset=123)  # flipping back restores it
    assert snap.verify() == []


def test_checksum_covers_every_byte_of_every_dtype():
    t = torch.arange(10, dtype=torch.float16)
    before = checksum(t)
    t.view(torch.uint8)[19] ^= 1
    assert checksum(t) != before
    assert checksum(torch.empty(0)) == 0


def test_the_snapshot_holds_the_state_as_of_begin_even_when_training_mutates_it_after_the_fence():
    state = make_state(5)
    expected = {n: t.clone() for n, t in state.items()}
    snapper = Snapshotter()
    assert snapper.begin(5, state)
    snapper.fence(timeout_s=10)  # what the trainer calls before optimizer.step()
    for t in state.values():
        t.add_(1)  # the next optimizer step
    snap = snapper.wait(timeout_s=10)
    assert all(torch.equal(snap.tensors[n], expected[n]) for n in state)
    assert snap.verify() == []


def test_double_buffering_keeps_the_last_complete_snapshot_valid_while_the_next_is_written():
    snapper = Snapshotter()
    first = snapper.take(1, make_state(1))
    gate = threading.Event()
    snapper.before_copy = lambda: gate.wait(10)  # hold the next copy mid-flight
    assert snapper.begin(2, make_state(2))
    assert snapper.busy
    assert snapper.latest is first and first.step == 1 and first.verify() == []
    assert all(torch.equal(first.tensors[n], t) for n, t in make_state(1).items())
    assert not snapper.begin(3, make_state(3))  # never blocks training: skipped
    assert snapper.stats.skipped == 1
    gate.set()
    second = snapper.wait(timeout_s=10)
    assert second.step == 2 and second is not first and second.verify() == []
    assert first.tensors["w"].data_ptr() != second.tensors["w"].data_ptr()


def test_a_snapshot_being_read_is_never_overwritten():
    snapper = Snapshotter()
    first = snapper.take(1, make_state(1))
    snapper.take(2, make_state(2))  # writes the other buffer
    with first.reading():  # e.g. still being sent to the buddy
        assert not snapper.begin(3, make_state(3))  # would overwrite `first`
        assert first.verify() == [] and first.step == 1
    third = snapper.take(3, make_state(3))
    assert third.step == 3 and third.tensors["w"].data_ptr() == first.tensors["w"].data_ptr()


def test_buffers_are_reallocated_when_the_shard_shapes_change_after_a_reshard():
    snapper = Snapshotter()
    snapper.take(1, {"w": torch.ones(8)})
    snapper.take(2, {"w": torch.ones(8)})
    snap = snapper.take(3, {"w": torch.full((4,), 2.0), "v": torch.zeros(2)})
    assert snap.tensors["w"].tolist() == [2.0] * 4 and snap.verify() == []


def test_fence_times_out_instead_of_hanging():
    snapper = Snapshotter()
    gate = threading.Event()
    snapper.before_copy = lambda: gate.wait(10)
    snapper.begin(1, make_state(1))
    with pytest.raises(TimeoutError):
        snapper.fence(timeout_s=0.05)
    gate.set()
    assert snapper.wait(timeout_s=10).step == 1


def test_a_failed_copy_is_reported_on_the_training_thread():
    snapper = Snapshotter()

    def boom():
        raise OSError("host memory gone")

    snapper.before_copy = boom
    snapper.begin(1, make_state(1))
    with pytest.raises(RuntimeError, match="host memory gone"):
        snapper.wait(timeout_s=10)
    assert snapper.latest is None


def test_large_shards_are_checksummed_chunk_by_chunk_and_any_chunk_is_covered(monkeypatch):
    import trainer.snapshot as snapshot_module
    monkeypatch.setattr(snapshot_module, "CHUNK_BYTES", 64)  # 4000 bytes -> 63 chunks, summed in parallel
    snap = Snapshotter().take(1, {"w": torch.randn(1000)})
    assert len(snap.checksums["w"]) == 63
    corrupt(snap, "w", offset=3999)  # the last byte of the last chunk
    assert snap.verify() == ["w"]


def test_complete_snapshots_are_the_latest_and_the_older_buffer_until_it_is_rewritten():
    snapper = Snapshotter()
    assert snapper.complete_snapshots() == []
    snapper.take(1, make_state(1))
    snapper.take(2, make_state(2))
    assert sorted(s.step for s in snapper.complete_snapshots()) == [1, 2]
    snapper.take(3, make_state(3))  # reuses step 1's buffer
    assert sorted(s.step for s in snapper.complete_snapshots()) == [2, 3]
