"""controller.replan: plan g+1 after failures, growth and drains (pure decisions)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.layout import equal_partition, even_shares, public_store_prefix
from controller.replan import ClusterView, choose_layout, drain, grow, replan, survivors_only
from protos.plan import Plan, WorkerAssignment
from common.spec import ElasticSpec, JobSpec, ModelSpec, Parallelism, Resources

NOW = 1000.0


def even_partition(model, pp):
    """Count-balanced stages, so the expected boundaries below are easy to read."""
    return equal_partition(model.layers, pp)
STORES = {"n0": "10.0.0.0:29400", "n1": "10.0.0.1:29400", "n2": "10.0.0.2:29400"}


def make_spec(*, dp: int, pp: int, min_workers: int = 1, max_workers: int = 0, gbs: int = 16, mbs: int = 2,
              layers: int = 4) -> JobSpec:
    spec = JobSpec(
        model=ModelSpec(layers=layers),
        global_batch_size=gbs,
        micro_batch_size=mbs,
        parallelism=Parallelism(dp=dp, pp=pp),
        resources=Resources(workers=dp * pp),
        elastic=ElasticSpec(min_workers=min_workers, max_workers=max_workers),
    )
    spec.validate()
    return spec


def first_plan(spec: JobSpec, per_node: int, nodes=("n0", "n1", "n2")) -> Plan:
    """Generation 1: ranks filled node by node, per_node slots each (a dp row per node when per_node == pp)."""
    dp, pp = spec.parallelism.dp, spec.parallelism.pp
    workers = tuple(
        WorkerAssignment(rank=r, node=nodes[r // per_node], slot=r % per_node, dp_rank=r // pp, pp_rank=r % pp)
        for r in range(dp * pp)
    )
    plan = Plan(job_id="j", generation=1, workers=workers, dp=dp, pp=pp, zero_stage=1,
                layer_partition=even_partition(spec.model, pp), sample_shares=even_shares(spec.global_batch_size, dp),
                store_address=STORES["n0"], store_prefix="j/g1/", reason="submit")
    plan.check()
    return plan


def where(plan: Plan) -> dict[int, tuple[str, int]]:
    return {w.rank: (w.node, w.slot) for w in plan.workers}


def test_one_worker_of_dp2_pp2_lost_without_spare_uses_every_survivor():
    """Issue 16: 3 survivors of dp2·pp2 run as dp1·pp3 (expected throughput 2.4 samples per
    one-worker sample time) rather than dp1·pp2 with one survivor idle (1.78); dp3·pp1 (2.67)
    would need more memory per worker than the spec's layout."""
    spec = make_spec(dp=2, pp=2)
    current = first_plan(spec, per_node=2)
    plan, reason = replan(spec, current, ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                          cause="worker-failed", now=NOW, partition=even_partition)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.generation) == (1, 3, 2)
    assert sorted(where(plan).values()) == [("n0", 0), ("n0", 1), ("n1", 0)]
    assert plan.layer_partition == (0, 2, 3, 4) and plan.sample_shares == (16,)
    assert plan.extra["idle"] == [] and plan.extra["idle_reason"] == ""
    assert plan.extra["metrics_backfill"] is None  # the metrics rank (1: dp0 on the last stage) lives on
    assert plan.extra["layout"]["expected_throughput"] == 2.4
    assert plan.extra["layout"]["bubble"] == 0.2  # (pp-1)/(m+pp-1) = 2/(8+2)
    assert "highest expected throughput" in plan.extra["layout"]["why"]
    assert "dp=2·pp=2" in reason and "dp=1·pp=3" in reason and "idle" not in reason


def test_one_worker_of_dp2_pp2_lost_keeps_pp_and_says_why_a_survivor_idles():
    spec = make_spec(dp=2, pp=2, layers=2)  # no 3-stage pipeline of 2 layers
    current = first_plan(spec, per_node=2)  # n0: ranks 0,1 (row 0); n1: ranks 2,3 (row 1)
    plan, reason = replan(spec, current, ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                          cause="worker-failed", now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.generation) == (1, 2, 2)
    assert where(plan) == {0: ("n0", 0), 1: ("n0", 1)}  # the complete pipeline keeps its ranks
    assert plan.layer_partition == current.layer_partition
    assert plan.sample_shares == (16,)
    assert plan.switch_at_step == -1
    assert public_store_prefix(plan.store_prefix) == "j/g2/" and plan.store_address == STORES["n0"]
    assert plan.extra["idle"] == [{"node": "n1", "slot": 0, "old_rank": 2}]
    assert plan.extra["previous_ranks"] == {"0": 0, "1": 1}
    assert "dp=2·pp=2" in reason and "dp=1·pp=2" in reason
    assert plan.extra["idle_reason"].startswith("dp=3·pp=1 would use all 3, but its per-worker memory estimate")
    assert f"1 survivor(s) idle: {plan.extra['idle_reason']}" in reason
    # the recovery record says it too
    from controller.recovery_decisions import pending_recovery

    entry = pending_recovery(cause="worker-failed", old=current, new=plan, at_step=3, failed_at=1.0, seen_at=1.0,
                             planned_at=1.0)
    assert entry["idle"] == 1 and entry["idle_reason"] == plan.extra["idle_reason"]


def test_a_survivor_idles_when_the_batch_leaves_no_layout_for_all_of_them():
    spec = make_spec(dp=2, pp=2, layers=2, gbs=4, mbs=2)  # at most 2 dp ranks of 2 samples
    plan, reason = replan(spec, first_plan(spec, per_node=2),
                          ClusterView(lost_ranks=frozenset({0}), store_addresses=STORES),
                          cause="worker-failed", now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (1, 2) and len(plan.extra["idle"]) == 1
    assert plan.extra["idle_reason"] == ("no layout uses all 3: dp·pp must equal it with pp <= model.layers=2 "
                                         "and dp <= global_batch_size/micro_batch_size=2")


def test_a_shallower_pipeline_is_chosen_only_when_its_memory_estimate_fits():
    """dp4·pp1 under ZeRO-2 holds the whole model but shards gradients and AdamW state over 4:
    less per worker than the spec's dp1·pp2 holds unsharded, and faster (no bubble)."""
    spec = make_spec(dp=1, pp=2, max_workers=4)
    current = Plan.from_dict({**first_plan(spec, per_node=2).to_dict(), "zero_stage": 2})
    view = ClusterView(free_slots={"n1": [0, 1]}, store_addresses=STORES)
    plan, reason = grow(spec, current, view, at_step=9, now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (4, 1) and plan.layer_partition == (0, 4)
    # ZeRO-1 shards only the AdamW state: the same layout no longer fits, the spec's depth stays
    zero1 = Plan.from_dict({**current.to_dict(), "zero_stage": 1})
    plan, reason = grow(spec, zero1, view, at_step=9, now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (2, 2)


def test_a_deeper_pipeline_than_the_spec_s_is_a_candidate_and_ties_go_to_fewer_workers():
    spec = make_spec(dp=2, pp=1, max_workers=4, gbs=4, mbs=2)
    current = first_plan(spec, per_node=1)
    # dp2·pp1 and dp2·pp2 both expect 2 samples per unit: the same speed for half the workers
    assert choose_layout(spec, current, 4) == (2, 1)
    spec3 = make_spec(dp=1, pp=1, max_workers=3, gbs=4, mbs=2)
    assert choose_layout(spec3, first_plan(spec3, per_node=1), 3) == (2, 1)  # 2.0 beats dp1·pp3's 1.5


def test_lost_worker_with_min_workers_3_repartitions_to_use_every_survivor():
    # dp3·pp1 would be faster, but holds the whole model per worker: the deeper dp1·pp3 fits
    spec = make_spec(dp=2, pp=2, min_workers=3)
    current = first_plan(spec, per_node=2)
    plan, reason = replan(spec, current, ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                          cause="worker-failed", now=NOW, partition=even_partition)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (1, 3)
    assert plan.layer_partition == (0, 2, 3, 4)
    assert plan.sample_shares == (16,)
    assert sorted(where(plan).values()) == [("n0", 0), ("n0", 1), ("n1", 0)]
    assert "re-partitioned" in reason


def test_deep_pipeline_that_no_longer_fits_is_repartitioned_over_fewer_stages():
    spec = make_spec(dp=1, pp=4, layers=8)
    current = first_plan(spec, per_node=2)
    plan, reason = replan(spec, current, ClusterView(lost_ranks=frozenset({1}), store_addresses=STORES),
                          cause="worker-failed", now=NOW, partition=even_partition)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (1, 3)
    assert plan.layer_partition == (0, 3, 6, 8)
    # no layout as deep as the spec's exists: the one with the least memory per worker, saying so
    assert "shallower than the spec's pp=4" in plan.extra["layout"]["why"]
    # rank 0 held layers 0-1 and keeps stage 0; the others keep the stage they overlap most
    assert plan.worker(0).node == "n0" and plan.worker(0).slot == 0


def test_lost_worker_replaced_by_spare_keeps_the_layout_and_every_other_rank():
    spec = make_spec(dp=2, pp=2)
    current = first_plan(spec, per_node=2)
    view = ClusterView(lost_ranks=frozenset({3}), free_slots={"n2": [0, 1]}, store_addresses=STORES)
    plan, reason = replan(spec, current, view, cause="worker-failed", now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (2, 2)
    assert where(plan) == {0: ("n0", 0), 1: ("n0", 1), 2: ("n1", 0), 3: ("n2", 0)}
    assert plan.sample_shares == (8, 8)


def test_survivors_first_runs_the_survivors_alone_then_the_growth_brings_the_spare_in():
    """Issue 16: a spare in a switch-now plan makes the survivors wait for a new process; the 3
    survivors of dp2·pp2 run dp1·pp3 at once, and the growth (a step boundary) adds the spare."""
    spec = make_spec(dp=2, pp=2)
    current = first_plan(spec, per_node=2)
    view = ClusterView(lost_ranks=frozenset({3}), free_slots={"n2": [0, 1]}, store_addresses=STORES)
    plan, reason = replan(spec, current, view, cause="worker-failed", now=NOW, partition=even_partition,
                          survivors_first=True)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.switch_at_step) == (1, 3, -1)
    assert sorted(where(plan).values()) == [("n0", 0), ("n0", 1), ("n1", 0)] and plan.extra["idle"] == []
    chosen = plan.extra["survivors_first"]
    assert chosen["chosen"] is True
    assert chosen["why"] == ("the 3 survivors run dp=1·pp=3 now, without waiting for a new process; "
                             "the job grows back to dp=2·pp=2 (4 workers) through a prepared growth")
    assert reason.endswith(f"survivors first: {chosen['why']}") and plan.reason == reason
    # the recovery entry carries the why
    from controller.recovery_decisions import pending_recovery

    entry = pending_recovery(cause="worker-failed", old=current, new=plan, at_step=3, failed_at=1.0, seen_at=1.0,
                             planned_at=1.0)
    assert entry["survivors_only"] is True and entry["survivors_reason"] == chosen["why"]
    # growth back to the spec's layout, keeping every survivor; then nothing more to grow into
    grown, why = grow(spec, plan, ClusterView(free_slots={"n2": [0, 1]}, store_addresses=STORES), at_step=9,
                      now=NOW, partition=even_partition)
    assert grown is not None, why
    assert (grown.dp, grown.pp, grown.switch_at_step) == (2, 2, 9)
    assert {("n0", 0), ("n0", 1), ("n1", 0)} < set(where(grown).values())
    assert grow(spec, grown, ClusterView(free_slots={"n2": [1]}, store_addresses=STORES), at_step=12,
                now=NOW)[0] is None
    # without survivors_first (a migration to a spare), the spare joins now, as before
    plain, _ = replan(spec, current, view, cause="migrate", now=NOW, partition=even_partition)
    assert (plain.dp, plain.pp) == (2, 2) and "survivors_first" not in plain.extra


def test_survivors_first_keeps_the_spare_when_the_survivors_alone_fall_short():
    spec = make_spec(dp=2, pp=2, layers=2)  # 3 survivors: dp1·pp2 would leave one idle
    current = first_plan(spec, per_node=2)
    spare = ClusterView(lost_ranks=frozenset({3}), free_slots={"n2": [0]}, store_addresses=STORES)
    plan, reason = replan(spec, current, spare, cause="worker-failed", now=NOW, survivors_first=True)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (2, 2) and ("n2", 0) in where(plan).values() and plan.extra["idle"] == []
    assert plan.extra["survivors_first"] == {"chosen": False, "why": (
        "the survivors' best layout dp=1·pp=2 leaves 1 of 3 idle: free slots join now")}
    assert "survivors first" not in reason
    # below min_workers alone
    strict = make_spec(dp=2, pp=2, min_workers=4)
    ok, why = survivors_only(strict, first_plan(strict, per_node=2), survivors=3, spares=1, partition=even_partition)
    assert not ok and why.startswith("the survivors alone cannot run (only 3 workers available, below "
                                     "elastic.min_workers=4)")
    # no free slot: nothing to choose
    assert survivors_only(spec, current, survivors=3, spares=0) == (
        False, "no free slot: the survivors are all there is")
    # the survivors' only layout is shallower than the spec's and larger per worker than it
    deep = make_spec(dp=1, pp=2)
    ok, why = survivors_only(deep, first_plan(deep, per_node=2), survivors=1, spares=1, partition=even_partition)
    assert not ok and why == ("the survivors' best layout dp=1·pp=1 exceeds the spec layout's memory estimate: "
                              "free slots join now")
    # free slots that add no worker (the batch allows one data-parallel rank, the model 3 stages)
    narrow = make_spec(dp=1, pp=3, layers=3, gbs=2, mbs=2, max_workers=4)
    ok, why = survivors_only(narrow, first_plan(narrow, per_node=3), survivors=3, spares=1, partition=even_partition)
    assert not ok and why == "free slots add no worker to dp=1·pp=3"


def test_agent_with_two_workers_lost_moves_the_store_and_shrinks():
    spec = make_spec(dp=2, pp=2)
    current = first_plan(spec, per_node=2)
    current = Plan.from_dict({**current.to_dict(), "store_address": STORES["n0"]})
    alive = {"n1": STORES["n1"]}  # n0 (ranks 0, 1 and the store) is gone
    plan, reason = replan(spec, current, ClusterView(lost_nodes=frozenset({"n0"}), store_addresses=alive),
                          cause="node-lost", now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp) == (1, 2)
    assert where(plan) == {0: ("n1", 0), 1: ("n1", 1)}
    assert plan.extra["previous_ranks"] == {"0": 2, "1": 3}
    assert plan.store_address == STORES["n1"]
    # the metrics rank (1) was on n0: the new metrics rank, a survivor, re-sends its recent steps
    assert plan.extra["metrics_backfill"] == {"node": "n1", "slot": 1}


def test_growth_from_2_to_4_workers_at_a_step_boundary():
    spec = make_spec(dp=2, pp=1, max_workers=4)
    current = first_plan(spec, per_node=1)  # n0 slot 0, n1 slot 0
    view = ClusterView(free_slots={"n2": [0, 1]}, store_addresses=STORES)
    plan, reason = grow(spec, current, view, at_step=10, now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.switch_at_step) == (4, 1, 10)
    assert where(plan) == {0: ("n0", 0), 1: ("n1", 0), 2: ("n2", 0), 3: ("n2", 1)}
    assert plan.sample_shares == (4, 4, 4, 4)


def test_growth_is_refused_at_max_workers_and_when_the_batch_cannot_be_split_further():
    spec = make_spec(dp=2, pp=1)  # max_workers defaults to resources.workers = 2
    current = first_plan(spec, per_node=1)
    view = ClusterView(free_slots={"n2": [0, 1]}, store_addresses=STORES)
    plan, reason = grow(spec, current, view, at_step=10, now=NOW)
    assert plan is None and "max_workers=2" in reason
    small_batch = make_spec(dp=2, pp=1, max_workers=4, gbs=4, mbs=2)  # dp can never exceed 4 // 2
    plan, reason = grow(small_batch, first_plan(small_batch, per_node=1), view, at_step=10, now=NOW)
    assert plan is None and "no growth possible" in reason


def test_drain_moves_the_node_s_ranks_to_free_slots_at_a_step_boundary():
    spec = make_spec(dp=2, pp=2)
    current = first_plan(spec, per_node=2)
    view = ClusterView(free_slots={"n2": [0, 1], "n1": []}, store_addresses=STORES)
    plan, reason = drain(spec, current, view, node="n1", at_step=7, now=NOW)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.switch_at_step) == (2, 2, 7)
    assert where(plan) == {0: ("n0", 0), 1: ("n0", 1), 2: ("n2", 0), 3: ("n2", 1)}
    assert not plan.workers_on("n1")
    assert plan.extra["cause"] == "drain n1"
    assert plan.extra["metrics_backfill"] is None  # the metrics rank stays (and a planned switch never asks)


def test_drain_of_a_node_without_workers_changes_nothing():
    spec = make_spec(dp=2, pp=2)
    plan, reason = drain(spec, first_plan(spec, per_node=2), ClusterView(store_addresses=STORES),
                         node="n2", at_step=7, now=NOW)
    assert plan is None and "no worker on node 'n2'" in reason


def test_below_min_workers_gives_no_plan_and_says_why():
    spec = make_spec(dp=2, pp=2, min_workers=4)
    plan, reason = replan(spec, first_plan(spec, per_node=2),
                          ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                          cause="worker-failed", now=NOW)
    assert plan is None
    assert "only 3 workers available, below elastic.min_workers=4" == reason


def test_min_workers_unreachable_with_the_global_batch_gives_no_plan():
    spec = make_spec(dp=4, pp=1, min_workers=3, gbs=8, mbs=2)
    assert choose_layout(spec, first_plan(spec, per_node=2), 4) == (4, 1)
    tight = make_spec(dp=2, pp=1, min_workers=2, gbs=4, mbs=2)
    reason = choose_layout(tight, first_plan(tight, per_node=1), 1)
    assert reason == "only 1 workers available, below elastic.min_workers=2"
    # 3 workers, but at most 2 dp ranks can each get a micro-batch of 2 from a batch of 4,
    # and 2 layers make at most 2 stages
    deep = make_spec(dp=1, pp=1, min_workers=1, max_workers=3, gbs=4, mbs=2, layers=2)
    deep.elastic.min_workers = 3
    reason = choose_layout(deep, first_plan(deep, per_node=1), 3)
    assert isinstance(reason, str) and "global_batch_size=4" in reason
    assert "(tried dp=2·pp=1=2, dp=1·pp=2=2)" in reason
    # with 4 layers a 3-stage pipeline reaches min_workers=3 (issue 16: deeper than the spec is allowed)
    deeper = make_spec(dp=1, pp=1, min_workers=1, max_workers=3, gbs=4, mbs=2, layers=4)
    deeper.elastic.min_workers = 3
    assert choose_layout(deeper, first_plan(deeper, per_node=1), 3) == (1, 3)


def test_nothing_lost_is_not_a_replan():
    spec = make_spec(dp=2, pp=2)
    plan, reason = replan(spec, first_plan(spec, per_node=2), ClusterView(store_addresses=STORES),
                          cause="worker-failed", now=NOW)
    assert plan is None and "no rank" in reason


@settings(max_examples=150, deadline=None)
@given(
    dp=st.integers(1, 4), pp=st.integers(1, 4), layers=st.integers(4, 8), per_node=st.integers(1, 4),
    lost=st.sets(st.integers(0, 15), max_size=6), spare_slots=st.integers(0, 4), gbs=st.integers(8, 32),
    min_workers=st.integers(1, 4), survivors_first=st.booleans(),
)
def test_any_replan_is_a_valid_plan_that_keeps_the_global_batch_and_survivor_slots(
        dp, pp, layers, per_node, lost, spare_slots, gbs, min_workers, survivors_first):
    min_workers = min(min_workers, dp * pp)
    if gbs // dp < 1:
        return
    spec = make_spec(dp=dp, pp=pp, layers=layers, gbs=gbs, mbs=1, min_workers=min_workers)
    nodes = tuple(f"n{i}" for i in range(16))
    current = first_plan(spec, per_node=per_node, nodes=nodes)
    lost = {r for r in lost if r < current.world_size}
    stores = {n: f"{n}:1" for n in nodes}
    view = ClusterView(lost_ranks=frozenset(lost), free_slots={"spare": list(range(spare_slots))},
                       store_addresses={**stores, "spare": "spare:1"})
    plan, reason = replan(spec, current, view, cause="worker-failed", now=NOW, survivors_first=survivors_first)
    if not lost:
        assert plan is None
        return
    survivors = {(w.node, w.slot): w.rank for w in current.workers if w.rank not in lost}
    if plan is None:
        assert min(current.world_size - len(lost) + spare_slots, spec.max_workers) < min_workers, reason
        return
    plan.check()
    assert plan.generation == 2 and public_store_prefix(plan.store_prefix) == "j/g2/"
    assert sum(plan.sample_shares) == gbs
    assert all(share >= spec.micro_batch_size for share in plan.sample_shares)
    assert plan.world_size >= min_workers
    slots = {(w.node, w.slot) for w in plan.workers}
    lost_slots = {(w.node, w.slot) for w in current.workers if w.rank in lost}
    assert not slots & lost_slots
    # every survivor runs a rank unless the layout has no room for it (then it idles)
    idle = {(i["node"], i["slot"]) for i in plan.extra["idle"]}
    assert set(survivors) == (slots & set(survivors)) | idle
    # spares are used only when every survivor already has a rank
    if slots - set(survivors):
        assert not idle
    # survivors alone: every one of them runs a rank, and no spare does
    if survivors_first and plan.extra["survivors_first"]["chosen"]:
        assert slots == set(survivors) and not idle


def test_growth_restores_the_spec_pipeline_depth_after_a_shrink():
    spec = make_spec(dp=1, pp=2, max_workers=2)
    shrunk = Plan(job_id="j", generation=3,
                  workers=(WorkerAssignment(rank=0, node="n0", slot=0, dp_rank=0, pp_rank=0),),
                  dp=1, pp=1, zero_stage=0, layer_partition=(0, 4), sample_shares=(16,),
                  store_address=STORES["n0"], store_prefix="j/g3/", reason="worker-failed")
    plan, reason = grow(spec, shrunk, ClusterView(free_slots={"n1": [0]}, store_addresses=STORES),
                        at_step=20, now=NOW, partition=even_partition)
    assert plan is not None, reason
    assert (plan.dp, plan.pp, plan.generation, plan.layer_partition) == (1, 2, 4, (0, 2, 4))
    assert where(plan) == {0: ("n0", 0), 1: ("n1", 0)}
    assert public_store_prefix(plan.store_prefix) == "j/g4/" and plan.switch_at_step == 20
