"""A plan is the same plan whichever path writes it: submit (controller.decisions.build_plan) and
re-plan (controller.replan.replan, grow) must agree, field by field, when they land on the same
slots and layout. Only what says why the generation exists differs by design: ``reason``,
``extra`` (the re-plan's bookkeeping), for a growth ``switch_at_step``, and the secret of the
store prefix (a fresh one per plan: compared without it).

The job is chosen so that a path computing a field its own way shows: the cost-balanced layer split
differs from a count-balanced one, and the global batch does not divide evenly over dp=3.
"""
from __future__ import annotations

from dataclasses import fields

from common.layout import equal_partition, even_shares, partition_for_spec, public_store_prefix, store_prefix
from common.spec import ElasticSpec, JobSpec, ModelSpec, Parallelism, Resources
from controller.decisions import NodeView, Slot, build_plan, schedule
from controller.replan import ClusterView, grow, replan
from protos.plan import Plan

JOB = "job-7"
NOW = 1000.0
AT_STEP = 40
STORES = {"n0": "10.0.0.0:29400", "n1": "10.0.0.1:29400"}
NODES = [NodeView(id=node, slots=2, ready=True, store_address=address) for node, address in STORES.items()]
BY_DESIGN = {"reason", "extra"}
"""Plan fields that say why a generation exists; every other field must agree."""


def make_spec(*, dp: int, pp: int) -> JobSpec:
    spec = JobSpec(
        model=ModelSpec(layers=6, vocab_size=2048),
        global_batch_size=14,
        micro_batch_size=2,
        parallelism=Parallelism(dp=dp, pp=pp, zero_stage=1),
        resources=Resources(workers=dp * pp),
        elastic=ElasticSpec(min_workers=3),
    )
    spec.validate()
    return spec


def submitted(spec: JobSpec, placement: list[Slot], *, generation: int) -> Plan:
    """What submit writes for this placement (the server's rule: the store of rank 0's node)."""
    address = next(n.store_address for n in NODES if n.id == placement[0].node)
    return build_plan(job_id=JOB, spec=spec, placement=placement, store_address=address, generation=generation)


def placement_of(plan: Plan) -> list[Slot]:
    return [Slot(node=w.node, slot=w.slot) for w in sorted(plan.workers, key=lambda w: w.rank)]


def _field(plan: Plan, name: str):
    value = getattr(plan, name)
    return public_store_prefix(value) if name == "store_prefix" else value


def differences(a: Plan, b: Plan, *, skip: set[str]) -> list[str]:
    return [f"{f.name}: {_field(a, f.name)!r} != {_field(b, f.name)!r}"
            for f in fields(Plan) if f.name not in skip and _field(a, f.name) != _field(b, f.name)]


def shrink_and_grow_back(partition=partition_for_spec) -> tuple[Plan, Plan, Plan]:
    """g1: submit dp2·pp2 on n0:0,1 n1:0,1; g2: rank 3 dies, min_workers=3 keeps every survivor
    (a three-worker layout); g3: its slot is free again and the job grows back to dp2·pp2 at AT_STEP."""
    spec = make_spec(dp=2, pp=2)
    placement, why = schedule(spec, NODES)
    assert placement is not None, why
    g1 = submitted(spec, placement, generation=1)
    lost = next(w for w in g1.workers if w.rank == 3)
    g2, why = replan(spec, g1, ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                     cause="worker-failed", now=NOW, partition=partition)
    assert g2 is not None, why
    g3, why = grow(spec, g2, ClusterView(free_slots={lost.node: [lost.slot]}, store_addresses=STORES),
                   at_step=AT_STEP, now=NOW + 1, partition=partition)
    assert g3 is not None, why
    return g1, g2, g3


def test_the_scenario_tells_the_layout_math_apart():
    model = make_spec(dp=2, pp=2).model
    assert partition_for_spec(model, 2) != equal_partition(model.layers, 2)
    assert len(set(even_shares(14, 3))) > 1


def test_a_failure_replan_writes_what_submit_would_write_for_its_slots_and_layout():
    _, g2, _ = shrink_and_grow_back()
    assert (g2.world_size, g2.generation) == (3, 2)
    expected = submitted(make_spec(dp=g2.dp, pp=g2.pp), placement_of(g2), generation=2)
    assert differences(g2, expected, skip=BY_DESIGN) == []
    assert g2.sample_shares == expected.sample_shares == even_shares(14, g2.dp)
    assert g2.layer_partition == expected.layer_partition == partition_for_spec(make_spec(dp=2, pp=2).model, g2.pp)
    assert g2.switch_at_step == expected.switch_at_step == -1


def test_growing_back_to_the_submitted_world_writes_the_submitted_plan_again():
    g1, _, g3 = shrink_and_grow_back()
    assert {(w.node, w.slot) for w in g3.workers} == {(w.node, w.slot) for w in g1.workers}
    expected = submitted(make_spec(dp=2, pp=2), placement_of(g3), generation=3)
    assert differences(g3, expected, skip=BY_DESIGN | {"switch_at_step"}) == []
    assert (g3.switch_at_step, expected.switch_at_step) == (AT_STEP, -1)
    # the same world as the submit plan: only the generation and its store prefix moved on
    assert differences(g3, g1, skip=BY_DESIGN | {"switch_at_step", "generation", "store_prefix", "workers"}) == []
    assert g3.layer_partition == g1.layer_partition == partition_for_spec(make_spec(dp=2, pp=2).model, 2)


def test_every_generation_gets_its_own_store_prefix_from_the_one_format():
    plans = shrink_and_grow_back()
    secrets = [p.store_prefix.split("/")[2] for p in plans]
    assert [p.store_prefix for p in plans] == [store_prefix(JOB, g, secret) for g, secret in zip((1, 2, 3), secrets)]
    assert len(set(secrets)) == 3 and all(len(secret) == 32 for secret in secrets)  # 128 random bits each
    # no generation's keys can be read under another's prefix
    for a in plans:
        for b in plans:
            assert a is b or not b.store_prefix.startswith(a.store_prefix)
    assert not store_prefix(JOB, 10, "s").startswith(store_prefix(JOB, 1, "s"))


def test_the_comparison_catches_a_path_that_splits_layers_its_own_way():
    """A re-plan that split layers by count would differ from submit in layer_partition, and only there."""
    _, _, g3 = shrink_and_grow_back(partition=lambda model, pp: equal_partition(model.layers, pp))
    expected = submitted(make_spec(dp=2, pp=2), placement_of(g3), generation=3)
    found = differences(g3, expected, skip=BY_DESIGN | {"switch_at_step"})
    assert [d.split(":")[0] for d in found] == ["layer_partition"], found


def test_a_data_parallel_replan_splits_the_batch_as_submit_does():
    """dp4 loses a rank: dp3 over 14 samples is uneven (5, 5, 4), and both paths must split it alike."""
    spec = make_spec(dp=4, pp=1)
    placement, why = schedule(spec, NODES)
    assert placement is not None, why
    g1 = submitted(spec, placement, generation=1)
    g2, why = replan(spec, g1, ClusterView(lost_ranks=frozenset({3}), store_addresses=STORES),
                     cause="worker-failed", now=NOW)
    assert g2 is not None, why
    assert (g2.dp, g2.pp) == (3, 1)
    expected = submitted(make_spec(dp=3, pp=1), placement_of(g2), generation=2)
    assert differences(g2, expected, skip=BY_DESIGN) == []
    assert g2.sample_shares == even_shares(14, 3) == (5, 5, 4)
