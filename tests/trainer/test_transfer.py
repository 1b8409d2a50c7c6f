"""trainer.transfer: executing reshard plans between live processes (gloo), buddy replication."""

from __future__ import annotations

import torch

from tests.helpers.dist_harness import Workers
from common.layout import buddy_ring
from trainer.transfer import recoverable_step


def test_buddy_ring_puts_every_buddy_on_another_node_and_receives_one_replica_each():
    nodes = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}
    ring = buddy_ring(nodes)
    assert sorted(ring) == sorted(ring.values()) == [0, 1, 2, 3, 4]
    assert all(nodes[r] != nodes[b] for r, b in ring.items())
    assert buddy_ring({0: "a", 1: "a"}) == {0: 1, 1: 0}  # one node: a copy, but not off-node
    assert buddy_ring({0: "a"}) == {}


def test_recoverable_step_is_the_oldest_acknowledged_step():
    assert recoverable_step([5, 4, 6]) == 4
    assert recoverable_step([5, -1]) == -1


def test_a_plan_from_layout_a_to_b_reproduces_exactly_what_a_fresh_b_owner_holds(tmp_path):
    workers = Workers("transfer", 3, tmp_path)
    try:
        codes = workers.wait_exit([0, 1, 2], timeout_s=120)
        assert codes == {0: 0, 1: 0, 2: 0}, "".join(workers.log(r) for r in range(3))
        results = [workers.result(r) for r in range(3)]
    finally:
        workers.kill_all()
    for r in results:
        assert r["none"]["exact"] and r["home"]["exact"] and r["wire"]["exact"]
        assert r["none"]["rounds"] == 1 and r["none"]["bad"] == []
        assert r["lost"].startswith("no surviving copy")
    # corrupted copies at home are never advertised; the other copy is used
    bad_home = sorted(b for r in results for b in r["home"]["bad"])
    assert bad_home == ["buddy copy of m[18:25] on rank 0", "owner copy of w[10:20] on rank 1"]
    # a piece corrupted on the wire is caught on arrival and fetched again from another copy
    assert all(r["wire"]["rounds"] == 2 for r in results)
    assert any("arrived corrupt" in b for b in results[0]["wire"]["bad"])
    moved = sum(r["none"]["sent"] for r in results)
    assert moved == sum(r["none"]["received"] for r in results) > 0


def test_buddy_replicas_make_a_killed_rank_s_shard_recoverable_in_place(tmp_path):
    import signal
    workers = Workers("recovery", 4, tmp_path)
    try:
        workers.wait_key("victim-ready", timeout_s=120)
        workers.signal(3, signal.SIGKILL)
        codes = workers.wait_exit([0, 1, 2], timeout_s=90)
        assert codes == {0: 0, 1: 0, 2: 0}, "".join(workers.log(r) for r in range(3))
        results = [workers.result(r) for r in range(3)]
    finally:
        workers.kill_all()
    for r in results:
        assert r["recoverable"] == [1, 2, 3, 4]  # the step of the replica each rank holds for its ward
        assert r["released"] in ("CommFailed", "CommAborted")
        assert r["step"] == 4 and r["exact"]
    # step 3 of rank 0 rotted after its checksum: the copy its buddy (rank 2, the other node)
    # holds fails verification, as it is checked at use; no other copy is bad
    assert [r["rotten_held"] for r in results] == [[], [], [3]]
    assert results[1]["buddy"] == 3 and results[1]["replica_step"] == 4  # rank 1 holds dead rank 3's copy
    assert sum(r["bytes_sent"] for r in results) > 0


def test_replication_runs_on_the_training_thread_and_a_round_in_flight_is_kept(tmp_path):
    workers = Workers("replication", 4, tmp_path)
    try:
        codes = workers.wait_exit([0, 1, 2, 3], timeout_s=120)
        assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, "".join(workers.log(r) for r in range(4))
        results = [workers.result(r) for r in range(4)]
    finally:
        workers.kill_all()
    for r in results:
        assert r["new_threads"] == 0  # no replication thread, no wait thread: gloo's own threads move the bytes
        # post(k) first finishes the round of k-1: the ward's replica is then k-1
        assert r["held"] == [-1, 1, 2, 3]
        # and the sender keeps k-1 pinned (the step its buddy holds): with three buffer sets the
        # snapshotter writes around it, so the own copies cover the buddy's step and the two after
        assert r["acked"] == [-1, 1, 2, 3] and r["own_at_4"] == [2, 3, 4]
        assert r["replica"]["step"] == 6 and r["replica"]["exact"]
        # the verified replica of 6, and 7 whose round arrived but was never finished
        assert r["held_at_end"] == [6, 7] and r["held_exact"]
        assert r["gathered"]
    by_ward = {r["ward"]: r for r in results}
    assert by_ward[0]["replica"]["spans"] == {"w": [0, 13], "m": [0, 9]}  # rank 0's new layout reached its buddy


def test_a_big_round_moves_in_the_background_and_a_late_peer_holds_nobody(tmp_path):
    workers = Workers("big-round", 2, tmp_path)
    try:
        codes = workers.wait_exit([0, 1], timeout_s=120)
        assert codes == {0: 0, 1: 0}, workers.log(0) + workers.log(1)
        fast, late = workers.result(0), workers.result(1)
    finally:
        workers.kill_all()
    # rank 0 posts round 2 at once and goes on; its round moves until the late rank 1 sends
    assert fast["post_s"] < 0.5 and fast["busy_after_post"]
    assert 0.6 < fast["moving_s"] < 10
    for r in (fast, late):
        assert r["complete_s"] < 0.2  # done in the background: finishing it waits for nothing
        assert r["replica_step"] == 2 and r["replica_exact"] and r["replica_verifies"]
        assert r["threads_left"] == 0  # the round's waiter thread ended with it


def test_local_pieces_are_copied_as_one_run_per_contiguous_slab():
    from trainer.transfer import coalesce, copy_runs

    src = torch.arange(100, dtype=torch.float32)
    dst = torch.zeros(100)
    # the slices of ten "parameters", listed out of flat order (names sort differently)
    cuts = [(0, 7), (7, 20), (20, 21), (21, 50), (50, 64), (64, 80), (80, 99), (99, 100)]
    pairs = [(src[a:b], dst[a:b]) for a, b in reversed(cuts)]
    assert len(coalesce(pairs)) == 1
    assert copy_runs(pairs) == 1 and torch.equal(dst, src)
    # a gap in the source (another snapshot's piece in between) splits the run
    other = torch.full((10,), -1.0)
    dst2 = torch.zeros(30)
    runs = coalesce([(src[0:10], dst2[0:10]), (other, dst2[10:20]), (src[20:30], dst2[20:30])])
    assert len(runs) == 3
    copy_runs([(src[0:10], dst2[0:10]), (other, dst2[10:20]), (src[20:30], dst2[20:30])])
    assert torch.equal(dst2, torch.cat([src[0:10], other, src[20:30]]))
