"""trainer.snapshot: double-buffered, checksummed host snapshots (inline for small CPU states,
on a background thread otherwise)."""

from __future__ import annotations

import threading

import pytest
import torch

from trainer.snapshot import (CHUNK_BYTES, FOLD64, SLAB_ALIGN, Snapshot, Snapshotter, SnapshotSettings, allocate_slab,
                              as_slab, checksum, checksum_kind_of_flags, chunk_checksums, corrupt, fold_checksums,
                              read_header, slab_layout)

BACKGROUND = SnapshotSettings(inline_max_bytes=0)
"""Every snapshot through the background thread (the path of CUDA and large CPU states)."""


def make_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(1000, generator=g),
        "exp_avg/w": torch.randn(1000, generator=g),
        "step": torch.tensor([step], dtype=torch.int64),
        "half": torch.randn(37, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("settings", [SnapshotSettings(), BACKGROUND], ids=["inline", "background"])
def test_a_snapshot_copies_every_tensor_and_verifies(settings):
    state = make_state(3)
    snap = Snapshotter(settings).take(3, state, {"generation": 2})
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


@pytest.mark.parametrize("numel", [0, 1, 3, 255, 256, 257, 300_007, CHUNK_BYTES // 4, CHUNK_BYTES // 4 * 2 + 5])
def test_fold64_gives_one_word_per_chunk_and_changes_with_any_byte_or_any_move_of_words(numel):
    """Also: the host's float32 products equal the int8 product the GPU uses (torch._int_mm)."""
    t = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    before = fold_checksums(t)
    assert len(before) == max(1, -(-numel * 4 // CHUNK_BYTES))
    assert fold_checksums(t.clone()) == before  # a function of the bytes only
    if numel == 0:
        return
    u8, words = t.view(torch.uint8), t.view(torch.int32)
    for at in {0, numel * 4 // 2 + 1, numel * 4 - 1}:  # first, middle, last byte
        u8[at] ^= 0xFF
        assert fold_checksums(t) != before, f"byte {at}"
        u8[at] ^= 0xFF
    for i, j in {(0, numel - 1), (0, min(1, numel - 1)), (numel // 2, numel // 2 + 256)}:
        if j < numel and words[i] != words[j]:  # swapped words: within a row, between rows
            words[i], words[j] = words[j].clone(), words[i].clone()
            assert fold_checksums(t) != before, f"swap {i} {j}"
            words[i], words[j] = words[j].clone(), words[i].clone()
    assert fold_checksums(t) == before


def test_fold64_row_products_on_the_host_equal_the_int8_matrix_product():
    from trainer.snapshot import FOLD_ROW_BYTES, _fold_table, _row_products

    rows = torch.randint(-128, 128, (64, FOLD_ROW_BYTES), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    rows[0] = 127
    rows[1] = -128  # the extremes stay exact in float32
    exact = torch._int_mm(rows, _fold_table(rows.device, "int8")).to(torch.int64)
    assert torch.equal(_row_products(rows), exact)


def test_fold64_of_a_half_precision_view_at_an_odd_offset_matches_its_copy():
    t = torch.randn(1001).to(torch.bfloat16)[1:]
    assert fold_checksums(t) == fold_checksums(t.clone())


def test_a_fold64_snapshot_carries_its_kind_in_the_slab_header_and_verifies_with_it():
    state = {n: t.reshape(-1).clone() for n, t in make_state(4).items()}
    snap = Snapshot(step=4, tensors=state, checksum_kind=FOLD64,
                    checksums={n: chunk_checksums(t, FOLD64) for n, t in state.items()}, complete=True)
    assert snap.verify() == []
    step, flags, sums = read_header(as_slab(snap), slab_layout(state))  # what a buddy reads
    assert step == 4 and checksum_kind_of_flags(flags) == FOLD64 and sums == snap.checksums
    assert checksum_kind_of_flags(read_header(as_slab(Snapshotter().take(4, state)), slab_layout(state))[1]) == "crc32"
    corrupt(snap, "w", offset=17)
    assert snap.verify() == ["w"]
    with pytest.raises(ValueError, match="unknown checksum kind 'md5'"):
        chunk_checksums(state["w"], "md5")


@pytest.mark.parametrize("settings", [SnapshotSettings(), BACKGROUND], ids=["inline", "background"])
def test_the_snapshot_holds_the_state_as_of_begin_even_when_training_mutates_it_after_the_fence(settings):
    state = make_state(5)
    expected = {n: t.clone() for n, t in state.items()}
    snapper = Snapshotter(settings)
    assert snapper.begin(5, state)
    snapper.fence(timeout_s=10)  # what the trainer calls before optimizer.step()
    for t in state.values():
        t.add_(1)  # the next optimizer step
    snap = snapper.wait(timeout_s=10)
    assert all(torch.equal(snap.tensors[n], expected[n]) for n in state)
    assert snap.verify() == []


def test_double_buffering_keeps_the_last_complete_snapshot_valid_while_the_next_is_written():
    snapper = Snapshotter(BACKGROUND)
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


def test_with_three_buffer_sets_a_pinned_older_snapshot_is_kept_and_begin_does_not_skip():
    snapper = Snapshotter(SnapshotSettings(buffers=3))
    for step in (1, 2, 3, 4):  # nothing pinned: two sets alternate, no third is allocated
        snapper.take(step, make_state(step))
    assert sorted(s.step for s in snapper.complete_snapshots()) == [3, 4]
    acked = next(s for s in snapper.complete_snapshots() if s.step == 3)
    acked.pin()  # what the replicator holds: the step its buddy has
    snapper.take(5, make_state(5))  # with two sets this would be skipped (raises in take)
    snapper.take(6, make_state(6))  # the oldest unpinned set goes: 4, not 3
    assert sorted(s.step for s in snapper.complete_snapshots()) == [3, 5, 6]
    assert acked.step == 3 and acked.verify() == []
    assert all(torch.equal(acked.tensors[n], t) for n, t in make_state(3).items())
    acked.unpin()
    snapper.take(7, make_state(7))
    assert sorted(s.step for s in snapper.complete_snapshots()) == [5, 6, 7]
    assert snapper.stats.skipped == 0


def test_the_number_of_buffer_sets_is_checked():
    with pytest.raises(ValueError, match="buffers must be 2 or 3"):
        SnapshotSettings(buffers=4)


def test_buffers_are_reallocated_when_the_shard_shapes_change_after_a_reshard():
    snapper = Snapshotter()
    snapper.take(1, {"w": torch.ones(8)})
    snapper.take(2, {"w": torch.ones(8)})
    snap = snapper.take(3, {"w": torch.full((4,), 2.0), "v": torch.zeros(2)})
    assert snap.tensors["w"].tolist() == [2.0] * 4 and snap.verify() == []


def test_fence_times_out_instead_of_hanging():
    snapper = Snapshotter(BACKGROUND)
    gate = threading.Event()
    snapper.before_copy = lambda: gate.wait(10)
    snapper.begin(1, make_state(1))
    with pytest.raises(TimeoutError):
        snapper.fence(timeout_s=0.05)
    gate.set()
    assert snapper.wait(timeout_s=10).step == 1


@pytest.mark.parametrize("settings", [SnapshotSettings(), BACKGROUND], ids=["inline", "background"])
def test_a_failed_copy_is_reported_on_the_training_thread(settings):
    snapper = Snapshotter(settings)

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


def test_a_small_cpu_state_is_snapshotted_inside_begin_without_a_thread():
    snapper = Snapshotter()
    state = make_state(4)
    threads = threading.active_count()
    assert snapper.begin(4, state)
    assert threading.active_count() == threads  # nothing to hand over to: no thread, no GIL hand-off
    assert not snapper.busy and snapper.latest.step == 4 and snapper.latest.verify() == []
    snapper.fence(timeout_s=0.01)  # nothing in flight: returns at once
    for t in state.values():
        t.add_(1)
    assert all(torch.equal(snapper.latest.tensors[n], make_state(4)[n]) for n in state)


def test_a_state_above_the_inline_limit_goes_to_the_background_thread():
    snapper = Snapshotter(SnapshotSettings(inline_max_bytes=1000))
    copied_on = []
    snapper.before_copy = lambda: copied_on.append(threading.current_thread())
    assert snapper.begin(1, {"w": torch.ones(100)})  # 400 bytes: inline
    assert copied_on == [threading.current_thread()] and snapper.latest.step == 1
    gate = threading.Event()
    snapper.before_copy = lambda: gate.wait(10)
    assert snapper.begin(2, {"w": torch.ones(1000)})  # 4000 bytes: a thread copies it
    assert snapper.busy and snapper.latest.step == 1
    gate.set()
    assert snapper.wait(timeout_s=10).step == 2


def test_a_snapshot_is_one_aligned_slab_and_the_same_layout_rebuilds_the_same_views():
    snap = Snapshotter().take(1, make_state(1))
    base = snap.slab.data_ptr()
    for name, t in snap.tensors.items():
        offset = t.data_ptr() - base
        assert offset % SLAB_ALIGN == 0 and offset + t.numel() * t.element_size() <= snap.slab.numel()
    slab, views = allocate_slab(slab_layout(snap.tensors))  # e.g. a buddy's receive buffer
    slab.copy_(snap.slab)
    assert all(torch.equal(views[n], snap.tensors[n]) and views[n].dtype == snap.tensors[n].dtype for n in views)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_state_is_copied_on_a_side_stream_into_one_pinned_slab():
    state = {name: t.cuda() for name, t in make_state(6).items()}
    expected = {name: t.cpu() for name, t in state.items()}
    snapper = Snapshotter()
    assert snapper.begin(6, state)  # never inline: the copy runs on a side stream
    snapper.fence()  # what the trainer calls before the update: the stream waits for the copy
    for t in state.values():
        t.add_(1)  # the next optimizer step, queued after the copy
    snap = snapper.wait(timeout_s=30)
    assert snap.step == 6 and snap.slab.is_pinned() and snap.verify() == []
    assert all(torch.equal(snap.tensors[name], expected[name]) for name in state)
    # checksummed on the GPU (fold64), equal to the host's fold64 of the bytes, caught when torn
    assert snap.checksum_kind == FOLD64
    assert snap.checksums == {name: fold_checksums(t) for name, t in expected.items()}
    assert checksum_kind_of_flags(read_header(snap.slab, slab_layout(snap.tensors))[1]) == FOLD64
    corrupt(snap, "exp_avg/w", offset=5)
    assert snap.verify() == ["exp_avg/w"]
    corrupt(snap, "exp_avg/w", offset=5)
    nxt = snapper.take(7, state)  # the other buffer set: pinned too, allocated off the training thread
    assert nxt.slab.is_pinned() and nxt.slab.data_ptr() != snap.slab.data_ptr()
    assert all(torch.equal(nxt.tensors[name], (expected[name] + 1)) for name in state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fold64_on_the_gpu_equals_fold64_on_the_host_for_a_multi_chunk_state():
    t = torch.randn(CHUNK_BYTES // 4 * 3 + 12345, generator=torch.Generator().manual_seed(8))
    host = fold_checksums(t)  # on a CUDA machine a host tensor this large is folded through the GPU
    from trainer.snapshot import fold_rows, fold_words
    assert fold_words(fold_rows(t.cuda()).tolist()) == host == fold_words(fold_rows(t).tolist())  # and on the host alone
    snap = Snapshotter().take(1, {"w": t.cuda()})
    assert snap.checksums["w"] == host and snap.verify() == []
