"""Elastic recovery, control side: the pure decisions (controller/recovery_decisions.py) and
the agent's progress relay across generations (agent/progress.py), without etcd or processes."""

from __future__ import annotations

import asyncio
import json

from agent.progress import ProgressRelay
from controller.decisions import Slot, build_plan
from controller.recovery_decisions import (
    GROWTH_RETRY_MAX_S,
    GROWTH_RETRY_S,
    all_ranks_on_generation,
    commit_plan,
    end_growth,
    growth_decision,
    start_growth,
    cause_label,
    close_superseded,
    complete_recovery,
    fail_before_first_step,
    failed_slots,
    find_failure,
    free_slots_for,
    open_recovery,
    pending_recovery,
    plan_records,
    rebalance_plan,
    should_drain,
    should_grow,
    switch_step,
    without_slots,
)
from controller.replan import ClusterView, replan
from protos.keys import Keys
from protos.plan import Plan
from protos.records import GrowthRecord, JoinerRecord, ProgressRecord, WorkerStatusRecord
from common.spec import JobSpec

SPEC = JobSpec.from_dict({
    "name": "t", "steps": 60, "global_batch_size": 16, "micro_batch_size": 2,
    "model": {"layers": 4}, "parallelism": {"dp": 2, "pp": 2, "zero_stage": 1},
    "elastic": {"min_workers": 1, "max_workers": 4}, "resources": {"workers": 4},
})
STORES = {"n0": "n0:1", "n1": "n1:1", "n2": "n2:1"}
SPEC_2_LAYERS = JobSpec.from_dict({**SPEC.to_dict(), "model": {**SPEC.to_dict()["model"], "layers": 2}})
"""SPEC with no room for a 3-stage pipeline: losing one of dp2·pp2 re-plans to dp1·pp2 (one survivor idle)."""


def first_plan():
    placement = [Slot(node="n0", slot=0), Slot(node="n0", slot=1), Slot(node="n1", slot=0), Slot(node="n1", slot=1)]
    return build_plan(job_id="j", spec=SPEC, placement=placement, store_address="n0:1")


def rec(rank, node, slot, state="RUNNING", generation=1, time=10.0, exit_code=None, signal=""):
    return WorkerStatusRecord(rank=rank, node=node, slot=slot, state=state, generation=generation, time=time,
                              exit_code=exit_code, signal=signal)


def running(plan):
    return {a.rank: rec(a.rank, a.node, a.slot, generation=plan.generation) for a in plan.workers}


# ------------------------------------------------------------------ failures
def test_a_killed_worker_is_a_failure_timed_by_its_exit_record():
    plan = first_plan()
    workers = running(plan)
    workers[1] = rec(1, "n0", 1, "FAILED", time=12.5, exit_code=137, signal="SIGKILL")
    failure = find_failure(plan, workers, {"n0", "n1"}, now=13.0)
    assert failure.cause == "worker-failed" and failure.lost_ranks == {1} and failure.failed_at == 12.5
    assert "rank 1 on n0 failed (signal SIGKILL)" == failure.description


def test_a_failure_before_the_first_step_fails_the_job_with_its_cause_instead_of_recovering():
    import dataclasses

    plan = first_plan()
    workers = running(plan)
    workers[2] = rec(2, "n1", 0, "EXITED", time=12.5, exit_code=1)
    failure = find_failure(plan, workers, {"n0", "n1"}, now=13.0)
    message = fail_before_first_step(plan, failure, step=0)
    assert message is not None and "before the first step" in message and "rank 2 on n1" in message
    assert "exit code 1" in message
    # the worker's exception line, when the control side has it, is the root cause shown
    line = "RuntimeError: Tensors must be CPU and dense (gloo send)"
    assert line in fail_before_first_step(plan, failure, step=0, errors={2: line, 0: "unrelated"})
    assert "unrelated" not in fail_before_first_step(plan, failure, step=0, errors={2: line, 0: "unrelated"})
    # once a step completed there is state to recover: a re-plan
    assert fail_before_first_step(plan, failure, step=1) is None
    assert fail_before_first_step(dataclasses.replace(plan, generation=2), failure, step=0) is None


def test_a_lost_node_is_timed_by_its_ranks_last_heartbeat():
    plan = first_plan()
    progress = {2: ProgressRecord(step=5, time=20.0), 3: ProgressRecord(step=5, time=20.4),
                0: ProgressRecord(step=6, time=21.0)}
    failure = find_failure(plan, running(plan), {"n0"}, progress, now=23.0)
    assert failure.cause == "node-lost" and failure.lost_nodes == {"n1"} and failure.lost_ranks == {2, 3}
    assert failure.failed_at == 20.4


def test_no_failure_when_everything_runs():
    plan = first_plan()
    assert find_failure(plan, running(plan), {"n0", "n1"}) is None


def test_records_follow_the_slot_not_the_rank_across_generations():
    """Generation 2 after rank 1 died: dp1·pp2, the survivor on (n1,1) (rank 3) is rank 1 now and
    holds the key of the dead worker's rank; the dead worker's record is no failure of generation 2."""
    g1 = first_plan()
    g2, _ = replan(SPEC_2_LAYERS, g1, ClusterView(lost_ranks=frozenset({1}), store_addresses=STORES),
                   cause="worker-failed", now=100.0)
    workers = {0: rec(0, "n0", 0, generation=2, time=101.0), 1: rec(1, "n0", 1, "FAILED", time=99.0),
               2: rec(2, "n1", 0, generation=1, time=50.0), 3: rec(3, "n1", 1, generation=1, time=50.0)}
    assert find_failure(g2, workers, {"n0", "n1"}, now=101.0) is None
    # a survivor that dies after plan 2 was written, before its agent adopted it: a failure of plan 2
    survivor = next(a for a in g2.workers if (a.node, a.slot) == ("n1", 1))
    assert survivor.rank == 1 and g2.extra["previous_ranks"]["1"] == 3
    workers[3] = rec(3, "n1", 1, "FAILED", generation=1, time=100.5, exit_code=1)
    failure = find_failure(g2, workers, {"n0", "n1"}, now=101.0)
    assert failure is not None and failure.lost_ranks == {survivor.rank}
    assert set(plan_records(g2, workers)) >= {survivor.rank}


def test_recovering_ends_when_every_rank_did_a_step_at_the_new_generation():
    plan = first_plan()
    progress = {a.rank: ProgressRecord(step=3, time=1.0, generation=1) for a in plan.workers}
    assert all_ranks_on_generation(plan, progress, running(plan))
    progress[3] = ProgressRecord(step=3, time=1.0, generation=0)
    assert not all_ranks_on_generation(plan, progress, running(plan))


# ------------------------------------------------------------------ planned changes
def test_switch_step_is_a_few_seconds_of_steps_ahead_within_bounds():
    assert switch_step(10, 0.1) == 25
    assert switch_step(10, 5.0) == 13
    assert switch_step(10, 0.0001) == 60
    assert switch_step(10, 0.0) == 13


def test_growth_rules():
    plan = first_plan()
    args = dict(phase="RUNNING", plan=plan, max_workers=8, free_slot_count=2, step=5, total_steps=60,
                at_step=10, settled=True)
    assert should_grow(**args)[0]
    assert should_grow(**{**args, "max_workers": 4}) == (False, "job has 4 workers, max_workers=4")
    assert not should_grow(**{**args, "settled": False})[0]
    assert not should_grow(**{**args, "phase": "RECOVERING"})[0]
    assert not should_grow(**{**args, "free_slot_count": 0})[0]
    assert not should_grow(**{**args, "at_step": 60})[0]


def test_drain_rules():
    plan = first_plan()
    assert should_drain(phase="RUNNING", plan=plan, node="n1", settled=True)[0]
    assert should_drain(phase="RUNNING", plan=plan, node="n9", settled=True) == (False, "no worker on n9")
    assert not should_drain(phase="RUNNING", plan=plan, node="n1", settled=False)[0]
    # the job ends before the boundary: it leaves the node then, no plan that would never switch
    assert not should_drain(phase="RUNNING", plan=plan, node="n1", settled=True, at_step=60, total_steps=60)[0]


def test_free_slots_are_unused_slots_of_schedulable_nodes():
    free = free_slots_for({"n0": range(2), "n1": range(2), "n2": range(3)}, {"n0": {0, 1}, "n1": {0}})
    assert free == {"n1": [1], "n2": [0, 1, 2]}


def test_rebalance_keeps_workers_and_changes_shares_at_a_step():
    plan = first_plan()
    new, reason = rebalance_plan(plan, [10, 6], at_step=20, now=5.0)
    assert new.generation == 2 and new.sample_shares == (10, 6) and new.switch_at_step == 20
    assert new.workers == plan.workers and "rebalance" in reason
    assert rebalance_plan(plan, [10, 5], at_step=20, now=5.0)[0] is None
    assert rebalance_plan(plan, [8, 8], at_step=20, now=5.0) == (None, "shares unchanged")


# ------------------------------------------------------------------ recovery records
def test_a_recovery_entry_is_written_pending_and_completed_from_worker_records():
    old = first_plan()
    new, _ = replan(SPEC_2_LAYERS, old, ClusterView(lost_ranks=frozenset({1}), store_addresses=STORES),
                    cause="worker-failed", now=100.2)
    entry = pending_recovery(cause="worker-failed", old=old, new=new, at_step=7, failed_at=100.0, seen_at=100.05,
                             planned_at=100.08)
    assert entry["complete"] is False and entry["old_layout"] == {"dp": 2, "pp": 2, "zero_stage": 1}
    assert entry["new_layout"] == {"dp": 1, "pp": 2, "zero_stage": 1}
    assert abs(entry["detection_s"] - 0.05) < 1e-9 and abs(entry["plan_s"] - 0.03) < 1e-9
    assert open_recovery([entry], new.generation) == 0
    reports = [{"new_generation": 2, "rebuild_s": 0.1, "transfer_s": 0.05, "bytes_moved": 100, "steps_lost": 0,
                "at_step": 7, "from_disk": False},
               {"new_generation": 2, "rebuild_s": 0.2, "transfer_s": 0.01, "bytes_moved": 50, "steps_lost": 1,
                "at_step": 8, "from_disk": False},
               {"new_generation": 1, "rebuild_s": 9.0}]  # an older recovery of this rank: ignored
    done = complete_recovery(entry, reports, [100.6, 100.9])
    assert done["complete"] and done["rebuild_s"] == 0.2 and done["transfer_s"] == 0.05
    assert done["bytes_moved"] == 150 and done["steps_lost"] == 1 and done["at_step"] == 8
    assert abs(done["total_s"] - 0.9) < 1e-9
    assert open_recovery([done], new.generation) is None
    # a newer plan before it completed: closed as superseded
    assert close_superseded([entry])[0]["superseded"] is True


def test_a_recovery_whose_ranks_are_all_new_counts_the_steps_redone_from_the_controllers_view():
    """Every copy was lost with a node: no rank saw the failure (at_step -1 in their records);
    the controller's progress at the failure (step 30) against the step they resumed from disk."""
    old = first_plan()
    new, _ = replan(SPEC_2_LAYERS, old, ClusterView(lost_ranks=frozenset({1}), store_addresses=STORES),
                    cause="node-lost", now=100.2)
    entry = pending_recovery(cause="node-lost", old=old, new=new, at_step=30, failed_at=100.0, seen_at=100.05,
                             planned_at=100.08)
    reports = [{"new_generation": 2, "at_step": -1, "resumed_step": 28, "steps_lost": 0, "from_disk": True},
               {"new_generation": 2, "at_step": -1, "resumed_step": 28, "steps_lost": 0, "from_disk": True}]
    done = complete_recovery(entry, reports, [101.0])
    assert (done["at_step"], done["steps_lost"], done["from_disk"]) == (30, 2, True)
    # nothing on disk either: started over from step 0 (resumed_step -1), all 30 steps redone
    fresh = [{"new_generation": 2, "at_step": -1, "resumed_step": -1, "steps_lost": 0}]
    assert complete_recovery(entry, fresh, [101.0])["steps_lost"] == 30


def test_cause_labels_stay_bounded():
    assert cause_label("drain node-1") == "drain"
    assert cause_label("worker-failed") == "worker-failed"
    assert cause_label("something odd") == "manual"


# ------------------------------------------------------------------ the agent's relay across generations
class FakeEtcd:
    def __init__(self):
        self.puts: list[tuple[str, dict]] = []

    async def put(self, key, value, **_kw):
        self.puts.append((key, json.loads(value)))
        return 1


def step_line(step, generation, rank, dp_rank, pp_rank, layout, loss=1.0):
    return {"step": step, "loss": loss, "generation": generation, "rank": rank, "dp_rank": dp_rank,
            "pp_rank": pp_rank, "layout": layout, "step_time": 0.1, "time": 1000.0 + step}


def test_relay_publishes_each_generation_under_its_rank_and_the_recovery_at_once(tmp_path):
    etcd = FakeEtcd()
    keys = Keys()
    path = tmp_path / "m.jsonl"
    # generation 1: rank 2 = dp 1, stage 0 (not the metrics rank)
    lines = [step_line(1, 1, 2, 1, 0, "dp2pp2z1"), step_line(2, 1, 2, 1, 0, "dp2pp2z1"),
             {"event": "recovery", "new_generation": 2, "rank": 1, "rebuild_s": 0.1},
             # generation 2: rank 1 = dp 0, last stage (the metrics rank now)
             step_line(2, 2, 1, 0, 1, "dp1pp2z1", loss=0.5), step_line(3, 2, 1, 0, 1, "dp1pp2z1", loss=0.4)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))

    async def run():
        relay = ProgressRelay(etcd=etcd, keys=keys, job="j", rank=2, path=path, generation=1,
                              min_interval_s=60.0, relay_steps=False)
        relay._read_new_lines()
        await relay._publish(force=False)  # urgent: a recovery and a first step at a new generation
        return relay

    relay = asyncio.run(run())
    progress = [(k, v) for k, v in etcd.puts if "/progress/" in k]
    assert [k.rsplit("/", 1)[1] for k, _ in progress] == ["1"]
    value = progress[0][1]
    assert value["generation"] == 2 and value["step"] == 3
    assert value["recovery"]["new_generation"] == 2
    assert value["generation_first_step"] == {"generation": 2, "step": 2, "time": 1002.0}
    batches = [v for k, v in etcd.puts if "/metrics/" in k]
    assert [s["step"] for b in batches for s in b["steps"]] == [2, 3]  # generation 2's steps only
    assert relay.roles[1] == (2, False)


def test_relay_waits_for_the_role_of_a_generation_it_cannot_tell(tmp_path):
    etcd = FakeEtcd()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 5, "loss": 0.3, "generation": 3, "step_time": 0.1, "time": 5.0}) + "\n")

    async def run():
        relay = ProgressRelay(etcd=etcd, keys=Keys(), job="j", rank=0, path=path, generation=2,
                              min_interval_s=0.0, relay_steps=False)
        relay._read_new_lines()
        await relay._publish(force=True)
        before = list(etcd.puts)
        relay.set_role(3, 1, True)
        await relay._publish(force=True)
        return before

    before = asyncio.run(run())
    assert before == []
    keys = [k for k, _ in etcd.puts]
    assert keys[0].endswith("/progress/1") and any("/metrics/" in k for k in keys)


def test_growth_never_lands_on_a_slot_where_the_job_failed():
    plan = first_plan()
    plan = Plan.from_dict({**plan.to_dict(), "extra": {"failed_slots": [["n0", 1], ["bad"], ["n1", "x"]]}})
    assert failed_slots(plan) == {("n0", 1)}
    assert without_slots({"n0": [1], "n2": [0, 1]}, failed_slots(plan)) == {"n2": [0, 1]}


def test_relay_ignores_worker_events_that_name_a_step(tmp_path):
    etcd = FakeEtcd()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"event": "step_error", "step": 20, "rank": 0, "time": 5.0}) + "\n")

    async def run():
        relay = ProgressRelay(etcd=etcd, keys=Keys(), job="j", rank=0, path=path, generation=2,
                              min_interval_s=0.0, relay_steps=True)
        relay._read_new_lines()
        await relay._publish(force=True)
        return relay

    relay = asyncio.run(run())
    assert relay.latest is None and relay.first_step is None and etcd.puts == []


def test_pending_jobs_get_free_slots_before_growth():
    args = dict(phase="RUNNING", plan=first_plan(), max_workers=8, free_slot_count=2, step=5, total_steps=60,
                at_step=10, settled=True)
    assert should_grow(**args)[0]
    assert should_grow(**args, jobs_waiting=True) == (False, "pending jobs come first: free slots are theirs")


# ------------------------------------------------------------------ two-phase growth
def _grown(base):
    """Plan g+1 of ``base`` (dp1·pp2 on n0) grown onto n1's two slots: dp2·pp2."""
    from controller.replan import grow

    plan, reason = grow(SPEC, base, ClusterView(free_slots={"n1": [0, 1]}, store_addresses=STORES),
                        at_step=-1, now=100.0)
    assert plan is not None, reason
    return plan


def _small_plan():
    placement = [Slot(node="n0", slot=0), Slot(node="n0", slot=1)]
    spec = JobSpec.from_dict({**SPEC.to_dict(), "parallelism": {"dp": 1, "pp": 2, "zero_stage": 1},
                              "resources": {"workers": 2}})
    return build_plan(job_id="j", spec=spec, placement=placement, store_address="n0:1")


def _ready(growth, state="READY", growth_id=None):
    return {(n, s): JoinerRecord(growth_id=growth_id or growth.id, node=n, slot=s, state=state)
            for n, s in growth.joiner_slots()}


def test_a_growth_is_prepared_with_the_tentative_plan_and_only_new_slots_start():
    base = _small_plan()
    growth = start_growth(base, _grown(base), growth_id="g2-a", now=100.0, timeout_s=60)
    assert growth.state == "PREPARING" and growth.base_generation == 1 and growth.deadline == 160.0
    assert sorted(growth.joiner_slots()) == [("n1", 0), ("n1", 1)]
    assert Plan.from_dict(growth.plan).switch_at_step == -1 and Plan.from_dict(growth.plan).world_size == 4
    # a retry on the same plan generation counts attempts; a new generation starts again at 1
    again = start_growth(base, _grown(base), growth_id="g2-b", now=200.0, previous=growth)
    assert again.attempt == 2
    assert start_growth(base, _grown(base), growth_id="x", now=1.0,
                        previous=GrowthRecord(**{**growth.to_dict(), "base_generation": 0})).attempt == 1


def test_growth_commits_when_every_joiner_is_ready_and_switches_a_few_steps_ahead():
    base = _small_plan()
    growth = start_growth(base, _grown(base), growth_id="g2-a", now=100.0, timeout_s=60)
    live = ["n0", "n1"]
    assert growth_decision(growth=growth, plan=base, joiners={}, live_nodes=live, now=101.0)[0] == "wait"
    one = dict(list(_ready(growth).items())[:1])
    decision, reason = growth_decision(growth=growth, plan=base, joiners=one, live_nodes=live, now=101.0)
    assert decision == "wait" and "n1/1" in reason
    # a READY record of an older attempt does not count
    stale = _ready(growth, growth_id="g2-old")
    assert growth_decision(growth=growth, plan=base, joiners=stale, live_nodes=live, now=101.0)[0] == "wait"
    assert growth_decision(growth=growth, plan=base, joiners=_ready(growth), live_nodes=live,
                           now=101.0)[0] == "commit"
    plan = commit_plan(growth, at_step=42, now=104.5)
    assert plan.generation == 2 and plan.switch_at_step == 42 and plan.reason.endswith("at step 42")
    assert plan.extra["growth_id"] == "g2-a" and plan.extra["prepare_s"] == 4.5
    assert plan.workers == Plan.from_dict(growth.plan).workers  # exactly the plan the joiners prepared for
    done = end_growth(growth, state="COMMITTED", reason="ready", now=104.5)
    assert done.state == "COMMITTED" and done.retry_after == 0.0
    assert growth_decision(growth=done, plan=base, joiners={}, live_nodes=live, now=105.0)[0] == "none"


def test_growth_is_abandoned_when_a_joiner_fails_its_node_goes_or_the_deadline_passes():
    base = _small_plan()
    growth = start_growth(base, _grown(base), growth_id="g2-a", now=100.0, timeout_s=60)
    live = ["n0", "n1"]
    failed = {**_ready(growth), ("n1", 1): JoinerRecord(growth_id="g2-a", node="n1", slot=1, state="FAILED",
                                                       reason="exit code 1")}
    decision, reason = growth_decision(growth=growth, plan=base, joiners=failed, live_nodes=live, now=101.0)
    assert decision == "abandon" and "n1/1 failed" in reason and "exit code 1" in reason
    # a node that left or was cordoned says nothing about the growth: withdrawn, retried without a backoff
    assert growth_decision(growth=growth, plan=base, joiners={}, live_nodes=["n0"], now=101.0) == \
        ("withdraw", "node n1 of a new worker is gone")
    assert growth_decision(growth=growth, plan=base, joiners={}, live_nodes=live, cordoned=["n1"],
                           now=101.0)[0] == "withdraw"
    decision, reason = growth_decision(growth=growth, plan=base, joiners=dict(list(_ready(growth).items())[:1]),
                                       live_nodes=live, now=160.0)
    assert decision == "abandon" and "n1/1 not ready within 60 s" in reason
    # the plan changed under it (a failure re-planned): stale
    newer = Plan.from_dict({**base.to_dict(), "generation": 2})
    assert growth_decision(growth=growth, plan=newer, joiners=_ready(growth), live_nodes=live,
                           now=101.0)[0] == "withdraw"


def test_an_abandoned_growth_is_retried_after_a_growing_backoff():
    base = _small_plan()
    growth = start_growth(base, _grown(base), growth_id="g2-a", now=100.0)
    dead = end_growth(growth, state="ABANDONED", reason="not ready", now=200.0)
    assert dead.retry_after == 200.0 + GROWTH_RETRY_S
    args = dict(phase="RUNNING", plan=base, max_workers=4, free_slot_count=2, step=5, total_steps=60,
                at_step=10, settled=True)
    assert should_grow(**args, growth=growth, now=150.0) == (False, "growth g2-a is being prepared")
    ok, reason = should_grow(**args, growth=dead, now=210.0)
    assert not ok and "next attempt in 20 s" in reason
    assert should_grow(**args, growth=dead, now=dead.retry_after)[0]
    # withdrawn (a node of a new worker left): the next attempt may come at once
    withdrawn = end_growth(growth, state="ABANDONED", reason="node n1 gone", now=200.0, backoff=False)
    assert withdrawn.retry_after == 200.0 and should_grow(**args, growth=withdrawn, now=200.0)[0]
    # a record of an older plan generation does not hold a new growth back
    assert should_grow(**args, growth=GrowthRecord(**{**growth.to_dict(), "base_generation": 0}), now=150.0)[0]
    third = end_growth(GrowthRecord(**{**growth.to_dict(), "attempt": 3}), state="ABANDONED", reason="x", now=0.0)
    assert third.retry_after == 4 * GROWTH_RETRY_S
    assert end_growth(GrowthRecord(**{**growth.to_dict(), "attempt": 30}), state="ABANDONED", reason="x",
                      now=0.0).retry_after == GROWTH_RETRY_MAX_S


def test_pending_recovery_of_a_growth_carries_its_prepare_time_and_bytes_local_is_summed():
    base = _small_plan()
    plan = commit_plan(start_growth(base, _grown(base), growth_id="g", now=0.0), at_step=9, now=3.0)
    entry = pending_recovery(cause="grow", old=base, new=plan, at_step=9, failed_at=3.0, seen_at=3.0,
                             planned_at=3.1, prepare_s=3.0)
    assert entry["prepare_s"] == 3.0 and entry["bytes_local"] == 0
    done = complete_recovery(entry, [{"new_generation": 2, "bytes_moved": 10, "bytes_local": 5, "total_s": 0.2},
                                     {"new_generation": 2, "bytes_moved": 0, "bytes_local": 7, "total_s": 0.3}],
                             [4.0])
    assert (done["bytes_moved"], done["bytes_local"], done["worker_total_s"]) == (10, 12, 0.3)
    from controller.convert import recovery_to_proto

    msg = recovery_to_proto(done)  # the API carries them (`tenax job ID --json`)
    assert (msg.bytes_moved, msg.bytes_local, msg.prepare_s, msg.worker_total_s) == (10, 12, 3.0, 0.3)


def test_a_growth_is_timed_by_the_survivors_stall_not_by_the_joiners_wait_for_the_boundary():
    entry = {"generation": 2, "failed_at": 0.0}
    survivor = {"new_generation": 2, "cause": "switch", "rebuild_s": 0.05, "transfer_s": 0.2, "total_s": 0.3}
    joiner = {"new_generation": 2, "cause": "join", "rebuild_s": 1.9, "transfer_s": 0.2, "total_s": 2.2,
              "bytes_moved": 64}
    done = complete_recovery(entry, [survivor, joiner], [3.0])
    assert (done["rebuild_s"], done["worker_total_s"], done["bytes_moved"]) == (0.05, 0.3, 64)
    assert complete_recovery(entry, [joiner], [3.0])["worker_total_s"] == 2.2  # only joiners: theirs


def test_the_capacity_wait_never_starts_before_the_plan_it_recovers_from():
    from controller.recovery_decisions import capacity_wait_start

    # a lost node's failure time is its ranks' last heartbeat: in a job recovering for minutes it
    # predates the plan; the job must still wait for the node's agent to come back
    assert capacity_wait_start(failed_at=100.0, planned_at=400.0, now=403.0) == 400.0
    assert capacity_wait_start(failed_at=401.0, planned_at=400.0, now=403.0) == 401.0  # a worker's exit time
    assert capacity_wait_start(failed_at=100.0, planned_at=0.0, now=403.0) == 100.0  # plan time unknown
    assert capacity_wait_start(failed_at=500.0, planned_at=400.0, now=403.0) == 403.0  # never in the future


def test_wait_for_capacity_waits_a_bounded_time_after_the_failure():
    from controller.recovery_decisions import wait_for_capacity

    assert wait_for_capacity(failed_at=100.0, now=130.0, wait_s=60.0)[0] is True
    wait, why = wait_for_capacity(failed_at=100.0, now=160.5, wait_s=60.0)
    assert wait is False and "60 s" in why
    assert wait_for_capacity(failed_at=100.0, now=100.0, wait_s=0.0)[0] is False  # 0: fail at once


def test_the_survivors_communication_failure_class_goes_into_the_recovery_entry_and_event():
    from common import events
    from protos.records import JobEventRecord

    entry = {"generation": 2, "failed_at": 0.0, "cause": "worker-failed: rank 1 on n1 killed (SIGKILL)"}
    reports = [{"new_generation": 2, "rank": 0, "cause": "comm-failed", "comm_error": "peer-died",
                "comm_error_detail": "Connection closed by peer [127.0.0.1]:39660"},
               {"new_generation": 2, "rank": 1, "cause": "comm-aborted", "comm_error": "timeout",
                "comm_error_detail": "gradient all-reduce did not complete within 60 s"},
               {"new_generation": 2, "rank": 2, "cause": "plan"}]
    done = complete_recovery(entry, reports, [1.0])
    assert done["comm_error"] == "peer-died" and done["comm_errors"] == {"0": "peer-died", "1": "timeout"}
    assert "Connection closed by peer" in done["comm_error_detail"]
    text = events.describe(JobEventRecord(kind="recovery", time=1.0, data=done))
    assert "survivors' communication failed: peer-died (Connection closed by peer" in text, text
    assert "comm_error" not in complete_recovery(entry, reports[2:], [1.0])  # a plan is no comm failure
