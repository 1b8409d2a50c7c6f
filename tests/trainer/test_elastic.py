"""Elastic in-place recovery, end to end on the worker side (issue 4).

Real worker processes (``python -m trainer.worker``), real etcd, real SIGKILL,
gloo. The test plays the control side (tests/helpers/elastic_harness.py): it serves the
rendezvous store, writes plan g+1 with controller/replan.py as soon as it sees a
worker die, and never restarts a worker.
"""

from __future__ import annotations

import math
import threading

import pytest

from tests.helpers.elastic_harness import ElasticJob, reference_losses, tiny_spec
from trainer.decisions import (auto_snapshot_interval, buddy_and_ward, choose_resume_step, common_disk_step,
                               disk_checkpoint_due, memory_covers_node_loss, rank_in_plan, steps_lost)
from trainer.faults import parse_faults
from trainer.reshard import Holding


# ------------------------------------------------------------ pure decisions
def test_my_rank_in_a_new_plan_is_found_by_node_and_slot(tmp_path):
    from tests.helpers.elastic_harness import first_plan

    plan = first_plan(tiny_spec(), "127.0.0.1:1")
    assert [rank_in_plan(plan, w.node, w.slot) for w in plan.workers] == [0, 1, 2, 3]
    assert rank_in_plan(plan, "c", 0) is None


def test_buddies_live_on_the_other_node():
    from tests.helpers.elastic_harness import first_plan

    plan = first_plan(tiny_spec(), "127.0.0.1:1")
    for w in plan.workers:
        buddy, ward = buddy_and_ward(plan, w.rank)
        assert plan.worker(buddy).node != w.node and plan.worker(ward).node != w.node


def test_memory_covers_a_node_loss_only_when_every_buddy_is_on_another_node():
    from dataclasses import replace

    from common.layout import ranks_replicated_on_their_node
    from tests.helpers.elastic_harness import first_plan

    plan = first_plan(tiny_spec(), "127.0.0.1:1")  # 2 nodes x 2 ranks: buddies across
    assert memory_covers_node_loss(plan) and ranks_replicated_on_their_node({0: "a", 1: "a", 2: "b", 3: "b"}) == []
    one_node = replace(plan, workers=tuple(replace(w, node="a") for w in plan.workers))
    assert not memory_covers_node_loss(one_node)
    assert len(ranks_replicated_on_their_node({0: "a", 1: "a", 2: "a", 3: "b"})) == 2  # 3 on a: a pair stays on a
    assert ranks_replicated_on_their_node({0: "a"}) is None  # a single worker: no second copy at all


def test_disk_checkpoints_follow_every_snapshot_the_writer_can_take_while_memory_misses_a_node():
    # memory covers a node: only the interval
    assert disk_checkpoint_due(200, every=100, last=100, memory_covers_node=True, writer_rested=True)[0]
    assert not disk_checkpoint_due(201, every=100, last=200, memory_covers_node=True, writer_rested=True)[0]
    # memory does not: every snapshot while the writer is free; a busy (or resting) writer skips, never queues
    due, why = disk_checkpoint_due(201, every=100, last=200, memory_covers_node=False, writer_rested=True)
    assert due and "node loss" in why
    assert not disk_checkpoint_due(202, every=100, last=201, memory_covers_node=False, writer_rested=False)[0]
    assert disk_checkpoint_due(300, every=100, last=201, memory_covers_node=False, writer_rested=False)[0]  # interval
    # never twice for one step; never with disk checkpoints off
    assert not disk_checkpoint_due(201, every=100, last=201, memory_covers_node=False, writer_rested=True)[0]
    assert not disk_checkpoint_due(201, every=0, last=0, memory_covers_node=False, writer_rested=True)[0]


def test_the_resume_step_is_the_newest_step_every_needed_slice_has_a_copy_of():
    needs = {0: {"w": [(0, 10)]}, 1: {"w": [(10, 20)]}}
    holdings = {
        5: [Holding(rank=0, name="w", start=0, end=10)],  # step 5: the second half is gone
        4: [Holding(rank=0, name="w", start=0, end=10), Holding(rank=1, name="w", start=5, end=20, role="buddy")],
        3: [Holding(rank=0, name="w", start=0, end=20)],
    }
    assert choose_resume_step(needs, holdings) == 4
    assert choose_resume_step(needs, {5: holdings[5]}) is None
    assert common_disk_step([[10, 20], [20, 10, 30], [20]]) == 20
    assert common_disk_step([[10], [20]]) is None
    assert steps_lost(7, 6) == 1 and steps_lost(6, 6) == 0


def test_a_submitted_disk_checkpoint_counts_once_flush_says_it_is_written(tmp_path, monkeypatch):
    """A recovery (and a fault that kills a rank) first lets the writer thread finish: a
    checkpoint handed over a step ago must not be missing only because it is still being written."""
    import threading

    import torch

    from trainer.checkpoints import DiskCheckpoints
    from trainer.snapshot import Snapshot, chunk_checksums

    disk = DiskCheckpoints(str(tmp_path / "checkpoints"), tiny_spec().model)
    release = threading.Event()
    real_save = disk.save

    def held_save(snap, **kw):  # the writer is slow (its first save also imports dcp, ~1 s)
        release.wait(30)
        return real_save(snap, **kw)

    monkeypatch.setattr(disk, "save", held_save)
    tensors = {"params": torch.arange(8, dtype=torch.float32)}
    snap = Snapshot(step=4, tensors=tensors, checksums={k: chunk_checksums(t) for k, t in tensors.items()},
                    metadata={"rank": 0}, complete=True)
    disk.submit(snap, generation=1, rank=0)
    assert not disk.flush(0.2)  # the writer is held: not on disk yet, and flush says so
    assert not (tmp_path / "checkpoints" / "step-00000004" / "g1-r0" / "done").exists()
    release.set()
    assert disk.flush(30)
    assert (tmp_path / "checkpoints" / "step-00000004" / "g1-r0" / "done").exists()
    assert disk.flush(0)  # nothing pending: at once


def test_the_disk_writer_rests_as_long_as_its_last_checkpoint_took(tmp_path, monkeypatch):
    """While memory misses a node every snapshot the writer can take goes to disk: a large state
    must not be written back to back, so the writer counts as free only after resting as long
    as its last checkpoint took."""
    import time

    import torch

    from trainer.checkpoints import DiskCheckpoints
    from trainer.snapshot import Snapshot, chunk_checksums

    disk = DiskCheckpoints(str(tmp_path / "checkpoints"), tiny_spec().model)
    assert disk.rested()  # nothing written yet
    real_save = disk.save

    def slow_save(snap, **kw):  # a large state: the write takes a while
        time.sleep(0.3)
        return real_save(snap, **kw)

    monkeypatch.setattr(disk, "save", slow_save)
    tensors = {"params": torch.arange(8, dtype=torch.float32)}
    disk.submit(Snapshot(step=1, tensors=tensors, checksums={k: chunk_checksums(t) for k, t in tensors.items()},
                         metadata={"rank": 0}, complete=True), generation=1, rank=0)
    assert not disk.rested()  # busy
    assert disk.flush(30)
    done = time.monotonic()
    assert disk.last_write_s >= 0.3
    assert not disk.rested(done + 0.1) and disk.rested(done + disk.last_write_s + 0.01)


def test_disk_checkpoints_keep_the_newest_k_of_this_process_and_no_other_rank_s(tmp_path):
    import torch

    from trainer.checkpoints import DiskCheckpoints
    from trainer.snapshot import Snapshot, chunk_checksums

    other = tmp_path / "checkpoints" / "step-00000002" / "g1-r1"  # another rank's save: never ours to delete
    other.mkdir(parents=True)
    (other / "done").write_text("{}")
    disk = DiskCheckpoints(str(tmp_path / "checkpoints"), tiny_spec().model, keep=2)
    for step in (2, 4, 6, 8):
        tensors = {"params": torch.full((8,), float(step))}
        disk.submit(Snapshot(step=step, tensors=tensors, checksums={k: chunk_checksums(v) for k, v in tensors.items()},
                             metadata={"rank": 0}, complete=True), generation=1, rank=0)
    assert disk.flush(60)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000006", "step-00000008"]
    assert [p.name for p in (root / "step-00000002").iterdir()] == ["g1-r1"]
    assert (root / "step-00000008" / "g1-r0" / "done").exists() and (root / "step-00000006" / "g1-r0" / "done").exists()
    with pytest.raises(ValueError, match="keep"):
        DiskCheckpoints(str(tmp_path / "checkpoints"), tiny_spec().model, keep=0)


def test_the_metrics_rank_s_recent_step_lines_go_with_its_checkpoint_and_come_back_from_it(tmp_path):
    """A restore from disk does not redo the steps up to the checkpoint; if the metrics rank that
    trained them was lost before its agent relayed them, the lines kept with the checkpoint are
    what the new metrics rank re-writes (trainer/elastic.py ``_resume``)."""
    import torch

    from trainer.checkpoints import DiskCheckpoints
    from trainer.snapshot import Snapshot, chunk_checksums
    from trainer.train import RECENT_STEP_LINES, MetricsWriter

    writer = MetricsWriter(str(tmp_path / "rank-0.metrics.jsonl"))
    for step in range(1, 300):
        writer.write({"step": step, "loss": 1.0 / step, "generation": 1, "rank": 0, "time": 1000.0 + step,
                      "step_time": 0.5, "comm": {"allreduce": 0.1}, "peak_memory_bytes": 1})
    writer.write({"event": "recovery", "step": 5, "loss": 0.0})  # not a step trained
    writer.write({"step": 299, "loss": 9.0, "replayed": True})  # not trained here either
    writer.close()
    assert len(writer.recent) == RECENT_STEP_LINES and writer.recent[-1] == {
        "step": 299, "loss": 1.0 / 299, "generation": 1, "rank": 0, "time": 1299.0, "step_time": 0.5}
    disk = DiskCheckpoints(str(tmp_path / "checkpoints"), tiny_spec().model)
    tensors = {"params": torch.arange(8, dtype=torch.float32)}
    snap = Snapshot(step=290, tensors=tensors, checksums={k: chunk_checksums(t) for k, t in tensors.items()},
                    metadata={"rank": 0}, complete=True)
    disk.submit(snap, generation=1, rank=0, step_lines=writer.recent)
    assert disk.flush(60)
    lines = disk.step_lines(290)  # the steps after the checkpoint are redone: not its lines
    assert [line["step"] for line in lines] == list(range(300 - RECENT_STEP_LINES, 291))
    assert lines[-1]["loss"] == 1.0 / 290 and disk.step_lines(4) == []


@pytest.mark.parametrize("zero", [0, 1])
def test_a_flat_snapshot_is_cut_into_exactly_the_slices_the_rank_owns(zero):
    from trainer.decisions import named_pieces, snapshot_metadata
    from trainer.parallel import ParallelLayout
    from trainer.sharding import state_layout

    spec = tiny_spec()
    layout = ParallelLayout(dp=2, pp=2, zero_stage=zero, layer_partition=(0, 1, 4), sample_shares=(4, 4),
                            micro_batch_size=2)
    for rank in range(layout.world_size):
        pieces = named_pieces(spec.model, snapshot_metadata(layout, rank, generation=3))
        assert {key: [(a, b)] for _, key, a, b, _ in pieces} == state_layout(spec.model, layout)[rank]
        for kind in ("param", "exp_avg", "exp_avg_sq"):  # the pieces tile the flat tensor, in order
            spans = sorted((offset, b - a) for k, _, a, b, offset in pieces if k == kind)
            assert [o for o, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]


def test_auto_snapshot_interval_hides_the_copy_behind_training():
    assert auto_snapshot_interval(0.001, 0.05) == 1
    assert auto_snapshot_interval(0.12, 0.05) == 3
    assert auto_snapshot_interval(0.1, 0.0) == 1
    # a replication round that held the next boundary 0.08 s took 0.13 s: every 3rd step hides it
    assert auto_snapshot_interval(0.001, 0.05, replication_wait_s=0.08) == 3


def test_fault_specs_parse():
    faults = parse_faults("rank=3,step=4,kind=kill,when=mid; rank=0,kind=corrupt-own")
    assert [(f.kind, f.rank, f.step, f.when) for f in faults] == [("kill", 3, 4, "mid"), ("corrupt-own", 0, -1, "between")]


def test_hang_join_fault_holds_only_a_process_started_for_its_generation(tmp_path):
    from trainer.faults import FaultInjector

    [fault] = parse_faults("kind=hang-join,gen=2,rank=-1")
    assert (fault.kind, fault.gen, fault.rank) == ("hang-join", 2, -1)
    injector = FaultInjector([fault], run_dir=str(tmp_path))
    injector.before_rendezvous(2, 1, 0)  # a survivor of generation 1 joins generation 2: not held
    injector.before_rendezvous(3, 2, 0)  # started for 2, now joining 3: not held
    assert not list(tmp_path.glob("hang-join-*"))
    held = threading.Thread(target=injector.before_rendezvous, args=(2, 2, 1), daemon=True)
    held.start()
    held.join(0.3)
    assert held.is_alive() and list(tmp_path.glob("hang-join-*"))


# ------------------------------------------------------ processes: recovery
@pytest.fixture(scope="module")
def reference_for(tmp_path_factory):
    """Losses of an uninterrupted run, one run per distinct spec for the whole module."""
    cache: dict[str, dict[int, float]] = {}

    def losses(spec) -> dict[int, float]:
        import json

        # the layout and elastic settings do not change losses (that is what these tests check)
        key = json.dumps({k: v for k, v in spec.to_dict().items()
                          if k not in ("parallelism", "resources", "elastic")}, sort_keys=True)
        if key not in cache:
            cache[key] = reference_losses(spec, tmp_path_factory.mktemp("reference"))
        return cache[key]
    return losses


def _assert_same_losses(job: ElasticJob, where, reference: dict[int, float], steps: int) -> dict[int, float]:
    last = {}
    for r in job.steps(*where):
        last[r["step"]] = r["loss"]  # a redone step keeps its last (post-recovery) loss
    assert sorted(last) == list(range(1, steps + 1)), sorted(last)
    for step, loss in last.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-4), (step, loss, reference[step])
    return last


@pytest.mark.parametrize("when", ["mid"])
def test_kill_9_of_one_worker_of_dp2_pp2_recovers_in_place_with_the_same_losses(tmp_path, etcd_url, reference_for, when):
    spec = tiny_spec(steps=10)
    reference = reference_for(spec)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        job.start(faults=f"rank=3,step=4,kind=kill,when={when}")
        pids = {where: p.pid for where, p in job.procs.items()}
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    assert dead == ("b", 1)  # rank 3 of generation 1
    survivors = [w for w in pids if w != dead]
    assert all(codes[w] == 0 for w in survivors), job.logs()
    # survivors were never restarted: the same process wrote every line
    for where in survivors:
        assert {r["pid"] for r in job.steps(*where)} == {pids[where]}
    trainers = [w for w in survivors if job.recoveries(*w) and job.steps(*w)[-1]["step"] == spec.steps]
    assert len(trainers) == 3, job.logs()  # dp1·pp3 after the loss: every survivor trains (issue 16)
    for where in trainers:
        (rec,) = job.recoveries(*where)
        assert rec["old_generation"] == 1 and rec["new_generation"] == 2
        assert rec["old_layout"] == "dp2pp2z1" and rec["new_layout"] == "dp1pp3z1"
        assert rec["steps_lost"] <= 1 and rec["resumed_step"] >= 3 and not rec["from_disk"]
        assert rec["bad_copies"] == [] and 0 < rec["total_s"] < 10
        # the buddy of each lost shard was placed on the rank that now needs it: local copies
        assert rec["bytes_moved"] + rec["bytes_local"] > 0
        _assert_same_losses(job, where, reference, spec.steps)


TWO_LAYER_MODEL = {"layers": 2, "d_model": 32, "heads": 2, "vocab_size": 64, "seq_len": 16, "dropout": 0.1}
"""tiny_spec's model with no room for a 3-stage pipeline: losing one worker of dp2·pp2 re-plans to
dp1·pp2 with one survivor idle (it still serves the replicas it holds before it leaves)."""

BIG_STATE_MODEL = {"layers": 2, "d_model": 192, "heads": 2, "vocab_size": 64, "seq_len": 16, "dropout": 0.1}
"""~0.9M params: a dp2 ZeRO-1 rank's state is ~5 MB, above DIRECT_WAIT_BYTES, so replication
rounds move in the background (a waiter thread each, the boundary votes in the step's all-reduce)."""


@pytest.mark.parametrize("when", ["between", "posted"])
def test_kill_9_with_rounds_moving_in_the_background_recovers_from_the_buddy_replica(tmp_path, etcd_url,
                                                                                      reference_for, when):
    from trainer.transfer import DIRECT_WAIT_BYTES

    spec = tiny_spec(steps=12, dp=2, pp=1, model=BIG_STATE_MODEL)
    reference = reference_for(spec)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        # between: once its last round is through; posted: right after the boundary posted a
        # round (carrying the step before the newest: background snapshots), before it moved.
        # The survivor's own copies must still include the step the replica it holds is at:
        # the replicator pins it, and the snapshotter writes around it (three buffer sets)
        job.start(faults=f"rank=1,step=5,kind=kill,when={when}")
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    assert dead == ("b", 0) and codes[("a", 0)] == 0, job.logs()
    (rec,) = job.recoveries("a", 0)
    assert (rec["old_layout"], rec["new_layout"]) == ("dp2pp1z1", "dp1pp1z1") and not rec["from_disk"]
    # a boundary skipped while a round moved is skipped whole (no snapshot either): the resume
    # step may be a few steps back, never a step some shard has no copy of
    assert rec["steps_lost"] <= 4 and rec["bad_copies"] == []
    assert rec["bytes_local"] > DIRECT_WAIT_BYTES  # rank 1's shard came from the replica rank 0 held
    _assert_same_losses(job, ("a", 0), reference, spec.steps)


def _run_kill_scenario(tmp_path, etcd_url, spec, faults: str):
    """Kill rank 3 of a dp2·pp2 job (plus ``faults``); returns (job, codes, the two training survivors)."""
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        job.start(faults="rank=3,step=4,kind=kill,when=mid;" + faults)
        job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    assert all(code == 0 for where, code in codes.items() if where != ("b", 1)), job.logs()
    trainers = [w for w in job.procs if job.recoveries(*w) and job.steps(*w)[-1]["step"] == spec.steps]
    assert len(trainers) == 2, job.logs()
    return job, trainers


def test_a_corrupted_snapshot_is_caught_and_another_copy_is_used(tmp_path, etcd_url, reference_for):
    # rank 0's snapshots rot in memory; its buddy (rank 2, left idle by the new plan) still
    # holds a verified replica and serves it before leaving
    spec = tiny_spec(steps=10, model=TWO_LAYER_MODEL)
    reference = reference_for(spec)
    job, trainers = _run_kill_scenario(tmp_path, etcd_url, spec, "rank=0,kind=corrupt-own")
    (rec,) = job.recoveries("a", 0)
    assert rec["bad_copies"] and all("rank 0" in b for b in rec["bad_copies"]), rec
    assert not rec["from_disk"] and rec["steps_lost"] <= 1 and rec["bytes_moved"] > 0
    for where in trainers:
        _assert_same_losses(job, where, reference, spec.steps)


def test_when_every_copy_of_a_shard_is_bad_the_disk_checkpoint_is_used(tmp_path, etcd_url, reference_for):
    # rank 0's ZeRO chunk of stage 0 lives in its own snapshots and in rank 2's replica:
    # with both rotten only the disk checkpoint (every 2 steps) has it
    spec = tiny_spec(steps=10, checkpoint_every=2, model=TWO_LAYER_MODEL)
    reference = reference_for(spec)
    job, trainers = _run_kill_scenario(tmp_path, etcd_url, spec, "rank=0,kind=corrupt-own;rank=2,kind=corrupt-replica")
    for where in trainers:
        (rec,) = job.recoveries(*where)
        assert rec["from_disk"] and rec["resumed_step"] in (2, 4), rec
        _assert_same_losses(job, where, reference, spec.steps)
    assert job.recoveries("a", 0)[0]["bad_copies"]


def test_growth_from_2_to_4_workers_switches_at_the_planned_step_without_losing_one(tmp_path, etcd_url, reference_for):
    spec = tiny_spec(steps=10, dp=1, pp=2, zero=1, max_workers=4)
    reference = reference_for(spec)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        job.start()
        old = {where: p.pid for where, p in job.procs.items()}
        job.wait_step("a", 0, 2)
        switch_at = max(r["step"] for r in job.steps("a", 0)) + 3
        plan2 = job.grow_into({"a": [1], "b": [1]}, at_step=switch_at)
        assert plan2.world_size == 4 and plan2.switch_at_step == switch_at
        job.write_plan(plan2)
        job.start(plan2)  # the agents start the new slots' workers with plan g2: they join with no state
        codes = job.wait_all()
    finally:
        job.close()
    assert set(codes.values()) == {0}, job.logs()
    for where, pid in old.items():
        assert {r["pid"] for r in job.steps(*where)} == {pid}
    for where in job.procs:
        (rec,) = job.recoveries(*where)
        assert rec["cause"] == ("switch" if where in old else "join"), rec
        assert rec["resumed_step"] == switch_at and rec["steps_lost"] == 0 and rec["new_layout"] == "dp2pp2z1"
        if where in old:
            _assert_same_losses(job, where, reference, spec.steps)
        else:  # a joiner's first step is the one after the switch
            assert min(r["step"] for r in job.steps(*where)) == switch_at + 1
            assert all(math.isclose(r["loss"], reference[r["step"]], rel_tol=1e-4) for r in job.steps(*where))
    assert sum(job.recoveries(*w)[0]["bytes_moved"] for w in job.procs) > 0  # the joiners' state came over the wire


def test_two_failures_in_a_row_reshard_pipeline_stages_down_to_one_worker(tmp_path, etcd_url, reference_for):
    spec = tiny_spec(steps=10, model=TWO_LAYER_MODEL)
    reference = reference_for(spec)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        # generation 1 loses rank 3; in generation 2 (dp1·pp2) rank 1 dies too
        job.start(faults="rank=3,step=3,kind=kill,when=mid;rank=1,step=6,kind=kill,gen=2,when=between")
        job.kill_and_replan()
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    assert dead == ("a", 1) and codes[("a", 0)] == 0, job.logs()
    first, second = job.recoveries("a", 0)
    assert (first["new_generation"], second["new_generation"]) == (2, 3)
    assert second["old_layout"] == "dp1pp2z1" and second["new_layout"] == "dp1pp1z1"
    assert first["steps_lost"] <= 1 and second["steps_lost"] <= 1 and not second["from_disk"]
    _assert_same_losses(job, ("a", 0), reference, spec.steps)


def test_a_failure_during_a_recovery_leads_to_the_next_generation_with_the_idle_survivor_back_in(
        tmp_path, etcd_url, reference_for):
    spec = tiny_spec(steps=10, model=TWO_LAYER_MODEL)
    reference = reference_for(spec)
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        # rank 3 dies at step 4; in generation 2's transfer its new rank 0 (a0) dies as well
        job.start(faults="rank=3,step=4,kind=kill,when=mid;rank=0,gen=2,kind=kill-in-transfer")
        pids = {where: p.pid for where, p in job.procs.items()}
        job.kill_and_replan()
        assert job.plan.extra["idle"] == [{"node": "b", "slot": 0, "old_rank": 2}]
        dead, code, _ = job.wait_for_death()
        assert dead == ("a", 0) and code == -9, job.logs()
        # the controller's part: the idle survivor's slot is free for generation 3
        job.write_plan(job.replan_without({0}, free={"b": [0]}))
        codes = job.wait_all()
    finally:
        job.close()
    assert codes[("a", 1)] == 0 and codes[("b", 0)] == 0, job.logs()
    for where in (("a", 1), ("b", 0)):
        assert {r["pid"] for r in job.steps(*where)} == {pids[where]}
        last = job.recoveries(*where)[-1]
        assert last["new_generation"] == 3 and last["new_layout"] == "dp1pp2z1", last
        assert last["steps_lost"] <= 1 and not last["from_disk"]
        # one outage: from generation 1 (where the first failure was noticed) straight to 3
        assert last["old_generation"] == 1 and "+" in last["cause"] and last["total_s"] > last["transfer_s"]
        _assert_same_losses(job, where, reference, spec.steps)
