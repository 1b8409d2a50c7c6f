"""The controller's pure decisions, called directly: scheduling, plans, job phase, progress, node state."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.decisions import (
    JobState,
    NodeView,
    Slot,
    build_plan,
    fold_progress,
    job_phase,
    node_state,
    schedule,
)
from common.layout import equal_partition as equal_layer_partition
from common.layout import even_shares
from controller.recovery_decisions import find_failure
from protos.records import ProgressRecord, WorkerStatusRecord
from common.spec import JobSpec

pytestmark = pytest.mark.timeout(30)


def spec(dp=2, pp=2, **kw) -> JobSpec:
    data = {"parallelism": {"dp": dp, "pp": pp}, "resources": {"workers": dp * pp},
            "model": {"layers": 8}, "global_batch_size": 17, "micro_batch_size": 2, "steps": 10}
    data.update(kw)
    return JobSpec.from_dict(data)


def node(id, slots=2, ready=True, cordoned=False, used=(), store="") -> NodeView:
    return NodeView(id=id, slots=slots, ready=ready, cordoned=cordoned, used_slots=frozenset(used),
                    store_address=store or f"{id}:29500")


# ------------------------------------------------------------------ schedule
def test_schedule_packs_dp_major_on_fewest_nodes():
    placement, reason = schedule(spec(dp=2, pp=2), [node("a", 2), node("b", 4), node("c", 2)])
    assert placement == [Slot(node="b", slot=s) for s in range(4)]
    assert "1 node" in reason


def test_schedule_spreads_when_no_single_node_fits_and_keeps_pipelines_together():
    placement, _ = schedule(spec(dp=2, pp=2), [node("a", 2), node("b", 2)])
    # rank = dp_rank*pp + pp_rank: ranks 0,1 (pipeline 0) on one node, 2,3 on the other.
    assert [(s.node, s.slot) for s in placement] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_schedule_skips_not_ready_cordoned_and_used_slots():
    nodes = [node("a", 4, ready=False), node("b", 4, cordoned=True), node("c", 2, used={0}), node("d", 2)]
    placement, _ = schedule(spec(dp=3, pp=1, global_batch_size=6), nodes)
    assert [(s.node, s.slot) for s in placement] == [("d", 0), ("d", 1), ("c", 1)]


def test_schedule_waits_when_slots_are_short():
    placement, reason = schedule(spec(dp=2, pp=2), [node("a", 2), node("b", 2, used={1})])
    assert placement is None
    assert "4 free slots" in reason and "3 free" in reason


def test_schedule_with_no_nodes_waits():
    placement, reason = schedule(spec(dp=1, pp=1), [])
    assert placement is None and "0 free on 0" in reason


# ------------------------------------------------------------------ plan
def test_even_shares_gives_remainder_to_first_ranks():
    assert even_shares(17, 2) == (9, 8)
    assert even_shares(10, 4) == (3, 3, 2, 2)
    assert sum(even_shares(1001, 7)) == 1001
    with pytest.raises(ValueError):
        even_shares(2, 3)


def test_equal_layer_partition():
    assert equal_layer_partition(8, 4) == (0, 2, 4, 6, 8)
    assert equal_layer_partition(5, 2) == (0, 3, 5)


def test_build_plan_generation_one():
    s = spec(dp=2, pp=2)
    placement = [Slot(node="a", slot=0), Slot(node="a", slot=1), Slot(node="b", slot=0), Slot(node="b", slot=1)]
    plan = build_plan(job_id="demo-abc", spec=s, placement=placement, store_address="a:29500")
    assert plan.generation == 1 and plan.switch_at_step == -1
    assert re.fullmatch(r"demo-abc/g1/[0-9a-f]{32}/", plan.store_prefix) and plan.store_address == "a:29500"
    assert plan.sample_shares == (9, 8)
    assert [(w.rank, w.dp_rank, w.pp_rank, w.node) for w in plan.workers] == [
        (0, 0, 0, "a"), (1, 0, 1, "a"), (2, 1, 0, "b"), (3, 1, 1, "b")]
    assert plan.layer_partition[0] == 0 and plan.layer_partition[-1] == 8 and len(plan.layer_partition) == 3
    plan.check()


# ------------------------------------------------------------------ job phase
def _plan(world=2):
    s = spec(dp=world, pp=1, global_batch_size=4 * world)
    placement = [Slot(node="a" if r % 2 == 0 else "b", slot=r // 2) for r in range(world)]
    return build_plan(job_id="j", spec=s, placement=placement, store_address="a:1")


def ws(rank, state, exit_code=None, node=None, signal="", generation=1):
    return WorkerStatusRecord(rank=rank, node=node or ("a" if rank % 2 == 0 else "b"), state=state,
                              exit_code=exit_code, signal=signal, generation=generation)


LIVE = frozenset({"a", "b"})


def test_phase_pending_without_plan():
    assert job_phase(JobState(phase="PENDING"), 0)[0] == "PENDING"


def test_phase_running_while_workers_run():
    state = JobState(phase="RUNNING", plan=_plan(), workers={0: ws(0, "RUNNING")}, live_nodes=LIVE)
    phase, reason = job_phase(state, 0)
    assert phase == "RUNNING" and "generation 1" in reason


def test_phase_succeeded_when_all_exit_zero():
    state = JobState(phase="RUNNING", plan=_plan(), live_nodes=LIVE,
                     workers={0: ws(0, "EXITED", 0), 1: ws(1, "EXITED", 0)})
    assert job_phase(state, 0) == ("SUCCEEDED", "all 2 workers exited 0")


def test_phase_needs_a_new_plan_on_nonzero_exit_or_signal():
    # controller/recovery.py writes plan g+1 (or FAILED) before this rule runs
    state = JobState(phase="RUNNING", plan=_plan(), live_nodes=LIVE,
                     workers={0: ws(0, "EXITED", 3), 1: ws(1, "KILLED", signal="SIGKILL")})
    phase, reason = job_phase(state, 0)
    assert phase == "RECOVERING" and reason.startswith("needs a new plan")
    assert "rank 0" in reason and "exit code 3" in reason and "SIGKILL" in reason


def test_phase_needs_a_new_plan_when_a_node_with_running_ranks_is_lost():
    state = JobState(phase="RUNNING", plan=_plan(), workers={0: ws(0, "RUNNING")}, live_nodes=frozenset({"a"}))
    phase, reason = job_phase(state, 0)
    assert phase == "RECOVERING" and "node b lost" in reason


def test_phase_ignores_lost_node_whose_ranks_already_succeeded():
    state = JobState(phase="RUNNING", plan=_plan(), live_nodes=frozenset({"a"}),
                     workers={0: ws(0, "EXITED", 0), 1: ws(1, "EXITED", 0)})
    assert job_phase(state, 0)[0] == "SUCCEEDED"


def test_once_a_rank_exited_0_at_this_generation_a_lost_node_or_late_failure_is_no_failure():
    # a rank exits 0 only past the final barrier, which every rank enters after the last step
    lost_b = JobState(phase="RUNNING", plan=_plan(), live_nodes=frozenset({"a"}),
                      workers={0: ws(0, "EXITED", 0), 1: ws(1, "RUNNING")})
    assert find_failure(lost_b.plan, lost_b.workers, lost_b.live_nodes) is None
    assert job_phase(lost_b, 0) == ("SUCCEEDED", "training finished; after the final step: rank 1 on b: node lost")
    still_exiting = JobState(phase="RUNNING", plan=_plan(), live_nodes=LIVE,
                             workers={0: ws(0, "EXITED", 0), 1: ws(1, "RUNNING")})
    assert job_phase(still_exiting, 0) == ("RUNNING", "training finished; waiting for rank(s) [1] to exit")
    crashed_after = JobState(phase="RUNNING", plan=_plan(), live_nodes=LIVE,
                             workers={0: ws(0, "EXITED", 0), 1: ws(1, "EXITED", 1)})
    phase, reason = job_phase(crashed_after, 0)
    assert phase == "SUCCEEDED" and "rank 1 on b: exited (exit code 1)" in reason


def test_an_exit_0_of_an_older_generation_does_not_finish_the_job():
    # e.g. a worker that left at a switch to generation 2 and exited 0 on its slot
    s = spec(dp=2, pp=1, global_batch_size=8)
    plan = build_plan(job_id="j", spec=s, placement=[Slot(node="a", slot=0), Slot(node="b", slot=0)],
                      store_address="a:1", generation=2, reason="growth")
    state = JobState(phase="RUNNING", plan=plan, live_nodes=frozenset({"a"}),
                     workers={0: ws(0, "EXITED", 0, generation=1), 1: ws(1, "RUNNING", generation=2)})
    phase, reason = job_phase(state, 0)
    assert phase == "RECOVERING" and "node b lost" in reason


def test_phase_ignores_worker_records_of_other_generations():
    state = JobState(phase="RUNNING", plan=_plan(), live_nodes=LIVE,
                     workers={0: ws(0, "FAILED", 1, generation=7)})
    assert job_phase(state, 0)[0] == "RUNNING"


def test_phase_recovering_lasts_until_every_rank_runs_the_new_generation():
    s = spec(dp=2, pp=1, global_batch_size=8)
    plan = build_plan(job_id="j", spec=s, placement=[Slot(node="a", slot=0), Slot(node="b", slot=0)],
                      store_address="a:1", generation=2, reason="node-lost")
    on_old = JobState(phase="RECOVERING", plan=plan, live_nodes=LIVE,
                      workers={0: ws(0, "RUNNING", generation=2), 1: ws(1, "RUNNING", generation=1)})
    assert job_phase(on_old, 0) == ("RECOVERING", "waiting for all ranks to run plan generation 2")
    adopted = {0: ws(0, "RUNNING", generation=2), 1: ws(1, "RUNNING", generation=2)}
    # adopted by its agent is not enough: every rank must have done a step at generation 2
    one_step = JobState(phase="RECOVERING", plan=plan, live_nodes=LIVE, workers=adopted,
                        progress={0: ProgressRecord(step=9, time=1.0, generation=2),
                                  1: ProgressRecord(step=8, time=1.0, generation=1)})
    assert job_phase(one_step, 0)[0] == "RECOVERING"
    on_new = JobState(phase="RECOVERING", plan=plan, live_nodes=LIVE, workers=adopted,
                      progress={0: ProgressRecord(step=9, time=1.0, generation=2),
                                1: ProgressRecord(step=9, time=1.0, generation=2)})
    assert job_phase(on_new, 0)[0] == "RUNNING"


def test_phase_cancelled_and_terminal_is_sticky():
    assert job_phase(JobState(phase="RUNNING", cancelled=True, plan=_plan()), 0)[0] == "CANCELLED"
    assert job_phase(JobState(phase="SUCCEEDED", cancelled=True), 0)[0] == "SUCCEEDED"


# ------------------------------------------------------------------ progress and nodes
def test_fold_progress_takes_furthest_step_and_loss_bearing_rank():
    s = spec(dp=1, pp=2, global_batch_size=4, steps=100)
    s.model.seq_len = 10
    ranks = {
        0: ProgressRecord(step=41, time=10.0, loss=None, tokens_per_s=400.0),
        1: ProgressRecord(step=40, time=9.0, loss=2.5, tokens_per_s=390.0, recoverable_step=39),
    }
    p = fold_progress(s, ranks)
    assert p.step == 41 and p.loss == 2.5 and p.tokens_per_s == 400.0
    # 59 steps left * 4 samples * 10 tokens / 400 tok/s
    assert p.eta_s == pytest.approx(59 * 40 / 400)
    assert p.recoverable_step == 0  # rank 0 reported none yet


def test_fold_progress_empty():
    assert fold_progress(spec(), {}).step == 0


def test_node_state_rules():
    assert node_state(registered=True, cordon_reason=None)[0] == "READY"
    assert node_state(registered=True, cordon_reason="drain") == ("CORDONED", "drain by operator")
    assert node_state(registered=False, cordon_reason="cordon")[0] == "NOT_READY"


# ------------------------------------------------------------------ properties
_nodes = st.lists(
    st.tuples(st.integers(0, 8), st.booleans(), st.booleans(), st.sets(st.integers(0, 7), max_size=4)),
    max_size=6,
).map(lambda items: [node(f"n{i}", slots, ready=ready, cordoned=cordoned, used={u for u in used if u < slots})
                     for i, (slots, ready, cordoned, used) in enumerate(items)])


@settings(max_examples=200, deadline=None)
@given(nodes=_nodes, dp=st.integers(1, 4), pp=st.integers(1, 3))
def test_schedule_places_every_rank_on_a_distinct_free_slot_or_waits(nodes, dp, pp):
    s = spec(dp=dp, pp=pp, global_batch_size=4 * dp)
    placement, reason = schedule(s, nodes)
    free = {(n.id, slot) for n in nodes if n.schedulable for slot in n.free_slots}
    if placement is None:
        assert len(free) < dp * pp and "waiting" in reason
        return
    chosen = [(p.node, p.slot) for p in placement]
    assert len(chosen) == dp * pp == len(set(chosen))
    assert set(chosen) <= free
    plan = build_plan(job_id="j", spec=s, placement=placement, store_address="x:1")
    assert sum(plan.sample_shares) == s.global_batch_size
