"""Quarantine through the real path: real etcd, an in-process controller, simulated agents
(the helpers of tests/test_recovery_controller.py write what agents and workers write).

A slot where a worker failed is out of the job for its cool-down, then the existing two-phase
growth brings the job back onto it; a slot or node that keeps failing is cordoned, with an event.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.quarantine import AUTO_CORDON_REASON, QUARANTINE_KEY, QuarantineSettings
from protos import tenax_pb2 as pb
from protos.keys import Keys
from protos.records import CordonRecord, JobEventRecord
from tests.conftest import run_async
from tests.controller.test_controller_api import _in_phase, add_node, good_spec, running, wait_until
from tests.controller.test_recovery_controller import (
    _recoveries_complete,
    generation_is,
    growth_in,
    kill,
    plan_of,
    report_running,
    say_ready,
)

pytestmark = pytest.mark.timeout(90)
KEYS = Keys()


async def job_on_two_nodes(api, cooldown_s: float, **settings):
    """A dp2·pp2 job on n1, n2 (2 slots each) at step 5 whose controller quarantines for ``cooldown_s``."""
    api.controller.recovery.quarantine = QuarantineSettings(base_cooldown_s=cooldown_s, **settings)
    leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2")]
    spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4, "elastic.min_workers": 1, "steps": 500})
    job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
    await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
    g1 = await plan_of(api, job.id)
    await report_running(api, g1, step=5)
    return leases, job, g1


async def fail_and_settle(api, job_id: str, plan, slot: tuple[str, int], step: int):
    """The worker at ``slot`` fails; the re-plan settles (every rank steps at it): the new plan."""
    count = len((await api.jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)).status.recoveries)
    rank = next(a.rank for a in plan.workers if (a.node, a.slot) == slot)
    await kill(api, plan, rank, time.time())
    new = await wait_until(lambda: generation_is(api, job_id, plan.generation + 1), 5)
    assert slot not in {(a.node, a.slot) for a in new.workers}
    await report_running(api, new, step=step, first_step_time=time.time())
    await wait_until(lambda: _recoveries_complete(api, job_id, count + 1), 5)
    return new


async def grow_back(api, job_id: str, plan, step: int):
    """The growth that follows (phase 1, the joiners say ready, phase 2): the new plan."""
    growth = await wait_until(lambda: growth_in(api, job_id, "PREPARING"), 10)
    assert growth.base_generation == plan.generation
    await say_ready(api, job_id, growth)
    new = await wait_until(lambda: generation_is(api, job_id, plan.generation + 1), 5)
    await report_running(api, new, step=max(step, new.switch_at_step + 1), first_step_time=time.time())
    return growth, new


def test_a_failed_slot_is_used_again_after_its_cooldown_through_the_two_phase_growth(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            cooldown = 2.0
            leases, job, g1 = await job_on_two_nodes(api, cooldown)
            failed_at = time.time()
            g2 = await fail_and_settle(api, job.id, g1, ("n1", 1), step=6)
            assert g2.extra["failed_slots"] == [["n1", 1]]
            (record,) = g2.extra[QUARANTINE_KEY]
            assert (record["node"], record["slot"], record["count"]) == ("n1", 1, 1)
            assert record["until"] == pytest.approx(failed_at + cooldown, abs=1.0)
            # quarantined: the free, healthy slot is not grown onto during the cool-down
            await asyncio.sleep(max(0.0, record["until"] - time.time() - 0.7))
            assert await growth_in(api, job.id, "PREPARING") is None
            assert (await plan_of(api, job.id)).generation == 2
            # past the cool-down, the job grows back to its size onto that slot
            growth, g3 = await grow_back(api, job.id, g2, step=7)
            assert time.time() >= record["until"]
            assert ("n1", 1) in growth.joiner_slots() and g3.world_size == 4 and (g3.dp, g3.pp) == (2, 2)
            assert g3.extra["failed_slots"] == []  # over, but remembered for the next cool-down's length
            assert [r["count"] for r in g3.extra[QUARANTINE_KEY]] == [1]
            # a second failure there: twice the cool-down
            await wait_until(lambda: _recoveries_complete(api, job.id, 2), 5)
            second_at = time.time()
            g4 = await fail_and_settle(api, job.id, g3, ("n1", 1), step=g3.switch_at_step + 2)
            (record,) = g4.extra[QUARANTINE_KEY]
            assert record["count"] == 2 and record["until"] == pytest.approx(second_at + 2 * cooldown, abs=1.0)
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 80)


def test_a_slot_that_keeps_failing_is_cordoned_for_the_job_with_an_event(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            leases, job, g1 = await job_on_two_nodes(api, 0.5, slot_cordon_failures=2, node_cordon_failures=10)
            g2 = await fail_and_settle(api, job.id, g1, ("n2", 0), step=6)
            _, g3 = await grow_back(api, job.id, g2, step=7)
            await wait_until(lambda: _recoveries_complete(api, job.id, 2), 5)
            g4 = await fail_and_settle(api, job.id, g3, ("n2", 0), step=g3.switch_at_step + 2)
            (record,) = g4.extra[QUARANTINE_KEY]
            assert "2 failures within" in record["cordoned"]
            kv = await api.etcd.get(KEYS.job_event(job.id, g4.generation * 10 + 9))
            event = JobEventRecord.from_json(kv.value)
            assert event.kind == "cordon" and event.data["cordons"][0]["node"] == "n2"
            assert event.data["cordons"][0]["slot"] == 0 and "slot n2/0" in event.data["message"]
            assert await api.etcd.get(KEYS.cordon("n2")) is None  # the slot, for this job; not the node
            # long past its cool-down, the job never grows back onto it
            await asyncio.sleep(1.5)
            assert await growth_in(api, job.id, "PREPARING") is None
            assert (await plan_of(api, job.id)).generation == g4.generation
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 80)


def test_a_node_that_keeps_failing_is_cordoned_with_a_reason(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            leases, job, g1 = await job_on_two_nodes(api, 30.0, slot_cordon_failures=5, node_cordon_failures=2)
            g2 = await fail_and_settle(api, job.id, g1, ("n1", 0), step=6)
            await fail_and_settle(api, job.id, g2, ("n1", 1), step=7)
            kv = await wait_until(lambda: api.etcd.get(KEYS.cordon("n1")), 5)
            cordon = CordonRecord.from_json(kv.value)
            assert cordon.reason.startswith(f"{AUTO_CORDON_REASON}: 2 failures")
            listed = await api.nodes.ListNodes(pb.ListNodesRequest(), timeout=5)
            assert {n.id: n.state for n in listed.nodes} == {"n1": pb.CORDONED, "n2": pb.READY}
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)
