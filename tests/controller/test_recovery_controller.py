"""Elastic recovery, control side, against a real etcd and an in-process controller.

Agents and workers are simulated: the tests write NodeInfo (under a lease), worker
status and progress keys (with the recovery extras agent/progress.py adds), exactly
as an agent would, and check the plans, phases and recovery records the controller
writes. The real processes: tests/e2e/test_e2e_elastic.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from controller import metrics
from protos import tenax_pb2 as pb
from protos.keys import Keys
from protos.plan import Plan
from protos.records import GrowthRecord, JobStatusRecord, JoinerRecord, ProgressRecord, WorkerStatusRecord
from tests.conftest import run_async
from tests.controller.test_controller_api import _get, _in_phase, add_node, good_spec, running, wait_until

pytestmark = pytest.mark.timeout(90)
KEYS = Keys()


async def plan_of(api, job_id: str) -> Plan:
    return Plan.from_json((await api.etcd.get(KEYS.job_plan(job_id))).value)


async def status_of(api, job_id: str) -> JobStatusRecord:
    return JobStatusRecord.from_json((await api.etcd.get(KEYS.job_status(job_id))).value)


async def report_running(api, plan: Plan, *, step: int, skip: tuple[tuple[str, int], ...] = (),
                         first_step_time: float | None = None, recovery: dict | None = None) -> None:
    """What the agents write while every worker of ``plan`` trains at ``step``."""
    now = time.time()
    for a in plan.workers:
        if (a.node, a.slot) in skip:
            continue
        await api.etcd.put(KEYS.job_worker(plan.job_id, a.rank), WorkerStatusRecord(
            rank=a.rank, node=a.node, slot=a.slot, state="RUNNING", pid=1000 + a.rank,
            generation=plan.generation, time=now).to_json())
        progress = ProgressRecord(step=step, time=now, loss=2.0, generation=plan.generation,
                                  step_time_s=0.1, recoverable_step=step).to_dict()
        if first_step_time is not None:
            progress["generation_first_step"] = {"generation": plan.generation, "step": step,
                                                 "time": first_step_time}
        if recovery is not None:
            progress["recovery"] = {**recovery, "rank": a.rank, "new_generation": plan.generation}
        await api.etcd.put(KEYS.job_progress_rank(plan.job_id, a.rank), json.dumps(progress))


async def kill(api, plan: Plan, rank: int, when: float) -> None:
    a = plan.worker(rank)
    await api.etcd.put(KEYS.job_worker(plan.job_id, rank), WorkerStatusRecord(
        rank=rank, node=a.node, slot=a.slot, state="FAILED", exit_code=137, signal="SIGKILL",
        generation=plan.generation, time=when).to_json())


async def generation_is(api, job_id: str, generation: int):
    plan = await plan_of(api, job_id)
    return plan if plan.generation == generation else None


def test_worker_failure_replans_recovers_and_records_the_recovery(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2")]
            spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4, "elastic.min_workers": 1})
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            g1 = await plan_of(api, job.id)
            await report_running(api, g1, step=5)

            killed_at = time.time()
            await kill(api, g1, 1, killed_at)
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 5)
            # every survivor used (issue 16): a 3-stage pipeline rather than dp1·pp2 with one idle
            assert (g2.dp, g2.pp, g2.switch_at_step) == (1, 3, -1) and g2.extra["idle"] == []
            assert g2.extra["failed_slots"] == [["n1", 1]]  # quarantined: not grown onto during its cool-down
            assert (g1.worker(1).node, g1.worker(1).slot) not in {(a.node, a.slot) for a in g2.workers}
            got = await wait_until(lambda: _in_phase(api, job.id, pb.RECOVERING), 5)
            pending = (await status_of(api, job.id)).recoveries[0]
            assert pending["cause"] == "worker-failed" and pending["complete"] is False
            assert 0 <= pending["detection_s"] < 2 and 0 <= pending["plan_s"] < 2
            assert "rank 1 on n1 failed (signal SIGKILL)" in got.status.message

            # every rank of generation 2 did a step there: RUNNING, the record completed
            first_step = killed_at + 0.4
            await report_running(api, g2, step=6, first_step_time=first_step,
                                 recovery={"rebuild_s": 0.12, "transfer_s": 0.03, "bytes_moved": 1000,
                                           "steps_lost": 0, "at_step": 5, "from_disk": False})
            done = await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            rec = done.status.recoveries[0]
            assert rec.cause == "worker-failed" and rec.generation == 2
            assert (rec.old_layout.dp, rec.new_layout.dp) == (2, 1)
            assert rec.rebuild_s == pytest.approx(0.12) and rec.transfer_s == pytest.approx(0.03)
            assert rec.bytes_moved == 3000 and rec.at_step == 5 and rec.steps_lost == 0  # the sum over 3 ranks
            assert rec.total_s == pytest.approx(first_step - killed_at, abs=0.01)
            assert metrics.RECOVERY_MTTR.labels(job.id)._value.get() == pytest.approx(rec.total_s)
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)


def test_a_node_lost_after_the_final_step_leaves_the_job_succeeded_not_replanned(etcd_url):
    """Ranks exit 0 only past the final barrier: once one has, the training is done. A node
    lost before its agent reported its workers' exits must not re-plan the finished job (new
    workers would start with no state anywhere and fail it)."""
    async def main():
        async with running(etcd_url) as api:
            n1 = await add_node(api.etcd, "n1", 2, ttl_s=30)
            n2 = await add_node(api.etcd, "n2", 2, ttl_s=30)
            spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4, "elastic.min_workers": 1})
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            g1 = await plan_of(api, job.id)
            await report_running(api, g1, step=10)
            lost = g1.worker(2).node
            for a in g1.workers:
                if a.node != lost:
                    await api.etcd.put(KEYS.job_worker(job.id, a.rank), WorkerStatusRecord(
                        rank=a.rank, node=a.node, slot=a.slot, state="EXITED", exit_code=0, pid=1000 + a.rank,
                        generation=1, time=time.time()).to_json())
            await api.etcd.revoke_lease(n2 if lost == "n2" else n1)  # its workers still read RUNNING
            done = await wait_until(lambda: _in_phase(api, job.id, pb.SUCCEEDED), 10)
            assert "training finished" in done.status.message and f"on {lost}: node lost" in done.status.message
            assert (await plan_of(api, job.id)).generation == 1 and not done.status.recoveries
            await api.etcd.revoke_lease(n1 if lost == "n2" else n2)
    run_async(main(), 60)


def test_failure_during_a_recovery_replans_from_the_latest_plan(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2")]
            spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4})
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            g1 = await plan_of(api, job.id)
            await report_running(api, g1, step=5)
            await kill(api, g1, 0, time.time())
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 5)
            # a survivor of generation 2 dies before anyone ran a step there (its agent had
            # not even adopted generation 2: the record still says generation 1)
            victim = next(a for a in g2.workers if (a.node, a.slot) == (g1.worker(2).node, g1.worker(2).slot))
            await api.etcd.put(KEYS.job_worker(job.id, 2), WorkerStatusRecord(
                rank=2, node=victim.node, slot=victim.slot, state="FAILED", exit_code=1, generation=1,
                time=time.time()).to_json())
            g3 = await wait_until(lambda: generation_is(api, job.id, 3), 5)
            assert (victim.node, victim.slot) not in {(a.node, a.slot) for a in g3.workers}
            status = await status_of(api, job.id)
            assert [r["generation"] for r in status.recoveries] == [2, 3]
            assert status.recoveries[0].get("superseded") is True and status.phase == "RECOVERING"
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)


def test_growth_when_a_node_joins_then_drain_at_a_step_boundary(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            leases, job, g1 = await dp1pp2_job_then_a_second_node(api)
            # phase 1: the new workers are started (by n2's agent) while plan 1 stays
            growth = await wait_until(lambda: growth_in(api, job.id, "PREPARING"), 5)
            assert sorted(growth.joiner_slots()) == [("n2", 0), ("n2", 1)] and growth.base_generation == 1
            await asyncio.sleep(0.5)
            assert (await plan_of(api, job.id)).generation == 1  # nothing switches before they are ready
            # phase 2: both ready -> plan 2 with the switch a few steps ahead
            await say_ready(api, job.id, growth)
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 5)
            assert (g2.dp, g2.pp) == (2, 2) and g2.switch_at_step > 3
            assert g2.workers == Plan.from_dict(growth.plan).workers and g2.extra["growth_id"] == growth.id
            assert (await growth_in(api, job.id, "COMMITTED")).id == growth.id
            assert (await status_of(api, job.id)).recoveries[0]["prepare_s"] > 0.4
            assert {(a.node, a.slot) for a in g1.workers} <= {(a.node, a.slot) for a in g2.workers}
            assert (await _get(api, job.id)).status.phase == pb.RUNNING  # a planned switch, nothing failed
            await report_running(api, g2, step=g2.switch_at_step + 1, first_step_time=time.time())
            await wait_until(lambda: _recoveries_complete(api, job.id, 1), 5)

            await api.nodes.DrainNode(pb.NodeRequest(node_id="n1"), timeout=5)
            g3 = await wait_until(lambda: generation_is(api, job.id, 3), 5)
            assert {a.node for a in g3.workers} == {"n2"} and g3.switch_at_step > g2.switch_at_step + 1
            status = await status_of(api, job.id)
            assert [r["cause"] for r in status.recoveries] == ["grow", "drain n1"]
            # rebalance through the API the detection loop calls
            await report_running(api, g3, step=g3.switch_at_step + 1, first_step_time=time.time())
            await wait_until(lambda: _recoveries_complete(api, job.id, 2), 5)
            ok, reason = await api.controller.recovery.request_rebalance(job.id, [5, 3], at_step=500)
            assert (ok, g3.dp) == (False, 1) and "positive numbers summing" in reason  # dp=1: one share
            ok, reason = await api.controller.recovery.request_replan(job.id, "hang", lost_ranks=[1])
            assert ok, reason
            g4 = await plan_of(api, job.id)
            assert g4.generation == 4 and g4.switch_at_step == -1
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)


async def dp1pp2_job_then_a_second_node(api):
    """A dp1·pp2 job (max 4 workers) running on node n1 at step 3, then node n2 (2 slots)
    joins: (the nodes' leases, the job, its plan 1)."""
    leases = [await add_node(api.etcd, "n1", 2, ttl_s=30)]
    spec = good_spec(**{"parallelism.dp": 1, "parallelism.pp": 2, "resources.workers": 2,
                        "elastic.max_workers": 4, "steps": 200})
    job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
    await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
    g1 = await plan_of(api, job.id)
    await report_running(api, g1, step=3)
    leases.append(await add_node(api.etcd, "n2", 2, ttl_s=30))
    return leases, job, g1


async def growth_in(api, job_id: str, state: str) -> GrowthRecord | None:
    kv = await api.etcd.get(KEYS.job_growth(job_id))
    growth = GrowthRecord.from_json(kv.value) if kv is not None else None
    return growth if growth is not None and growth.state == state else None


async def say_ready(api, job_id: str, growth: GrowthRecord, state: str = "READY") -> None:
    """What each new worker writes once prepared (or its agent, when it exited before)."""
    for node, slot in growth.joiner_slots():
        await api.etcd.put(KEYS.job_joiner(job_id, node, slot), JoinerRecord(
            growth_id=growth.id, node=node, slot=slot, state=state, pid=4242, time=time.time()).to_json())


def test_a_growth_whose_workers_never_get_ready_is_abandoned_and_retried_later(etcd_url):
    async def main():
        async with running(etcd_url) as api:
            api.controller.recovery.prepare_timeout_s = 1.0
            leases, job, g1 = await dp1pp2_job_then_a_second_node(api)
            first = await wait_until(lambda: growth_in(api, job.id, "PREPARING"), 5)
            # nobody says ready: abandoned after the timeout, the job keeps plan 1 and runs
            dead = await wait_until(lambda: growth_in(api, job.id, "ABANDONED"), 5)
            assert dead.id == first.id and "not ready within 1 s" in dead.reason and dead.retry_after > time.time()
            assert (await plan_of(api, job.id)).generation == 1
            assert (await _get(api, job.id)).status.phase == pb.RUNNING
            # the retry (backoff shortened for the test) fails at once: a new worker exited
            dead = GrowthRecord(**{**dead.to_dict(), "retry_after": 0.0})
            await api.etcd.put(KEYS.job_growth(job.id), dead.to_json())
            second = await wait_until(lambda: growth_in(api, job.id, "PREPARING"), 5)
            assert second.id != first.id and second.attempt == 2
            await say_ready(api, job.id, second, state="FAILED")
            dead = await wait_until(lambda: growth_in(api, job.id, "ABANDONED"), 5)
            assert dead.id == second.id and "failed before it was ready" in dead.reason
            assert (await plan_of(api, job.id)).generation == 1 and not await api.etcd.get_prefix(
                KEYS.job_joiners(job.id))
            # a READY record of the abandoned attempt does not make a later one switch
            dead = GrowthRecord(**{**dead.to_dict(), "retry_after": 0.0})
            await api.etcd.put(KEYS.job_growth(job.id), dead.to_json())
            third = await wait_until(lambda: growth_in(api, job.id, "PREPARING"), 5)
            await say_ready(api, job.id, second)
            await asyncio.sleep(0.5)
            assert (await plan_of(api, job.id)).generation == 1
            await say_ready(api, job.id, third)
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 5)
            assert g2.extra["growth_id"] == third.id and g2.world_size == 4
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)


async def _recoveries_complete(api, job_id: str, count: int) -> bool:
    status = await status_of(api, job_id)
    return len(status.recoveries) == count and all(r.get("complete") for r in status.recoveries) \
        and status.phase == "RUNNING"


def test_a_failure_that_leaves_no_worker_waits_for_workers_instead_of_failing(etcd_url):
    """Soak (issue #16): every node of the plan lost within seconds (agents restarted under the
    same ids 4-10 s later) FAILED the job at once ("only 0 workers available"). It waits,
    RECOVERING and saying so, and re-plans when workers come back."""
    async def main():
        async with running(etcd_url) as api:
            leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2")]
            spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4, "elastic.min_workers": 1})
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            g1 = await plan_of(api, job.id)
            await report_running(api, g1, step=5)
            for lease in leases:
                await api.etcd.revoke_lease(lease)

            async def waiting():
                status = await status_of(api, job.id)
                return status if status.phase == "RECOVERING" and "waiting for workers" in status.message else None

            status = await wait_until(waiting, 10)
            assert "only 0 workers available" in status.message, status.message
            await asyncio.sleep(1.0)  # several reconcile passes: still waiting, not FAILED
            assert (await status_of(api, job.id)).phase == "RECOVERING"
            assert (await plan_of(api, job.id)).generation == 1
            back = await add_node(api.etcd, "n3", 2, ttl_s=30)
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 10)
            assert {a.node for a in g2.workers} == {"n3"} and len(g2.workers) == 2
            await api.etcd.revoke_lease(back)
    run_async(main(), 60)


@pytest.mark.parametrize("survivors_first", [True, False])
def test_a_failure_with_a_free_slot_runs_the_survivors_now_then_grows_back_once(etcd_url, survivors_first):
    """Issue 16: the failure's plan leaves the free slot out (the survivors alone fit and use
    all three); once the recovery settled, the two-phase growth brings the job back to dp2·pp2,
    and nothing changes after that (no ping-pong). ``--no-survivors-first`` puts the free slot
    into the failure's plan, as before."""
    from controller.recovery import RecoverySettings

    async def main():
        async with running(etcd_url, recovery=RecoverySettings(survivors_first=survivors_first)) as api:
            leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2", "n3")]
            spec = good_spec(**{"parallelism.pp": 2, "resources.workers": 4, "elastic.max_workers": 4,
                                "steps": 500})
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            g1 = await plan_of(api, job.id)
            free = {("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1), ("n3", 0), ("n3", 1)} - \
                {(a.node, a.slot) for a in g1.workers}
            await report_running(api, g1, step=5)
            await kill(api, g1, 1, time.time())
            g2 = await wait_until(lambda: generation_is(api, job.id, 2), 5)
            pending = (await status_of(api, job.id)).recoveries[0]
            if not survivors_first:
                assert (g2.dp, g2.pp) == (2, 2) and {(a.node, a.slot) for a in g2.workers} & free
                assert "survivors_only" not in pending and "survivors first" not in g2.reason  # not weighed
                for lease in leases:
                    await api.etcd.revoke_lease(lease)
                return
            assert (g2.dp, g2.pp, g2.switch_at_step) == (1, 3, -1) and not {(a.node, a.slot) for a in g2.workers} & free
            assert pending["survivors_only"] is True
            assert pending["survivors_reason"].startswith("the 3 survivors run dp=1·pp=3 now")
            assert "survivors first" in (await status_of(api, job.id)).message
            assert await api.etcd.get(KEYS.job_growth(job.id)) is None  # nothing grows before the recovery settled
            await report_running(api, g2, step=6, first_step_time=time.time(), recovery={"rebuild_s": 0.1})
            growth = await wait_until(lambda: growth_in(api, job.id, "PREPARING"), 5)
            assert growth.base_generation == 2 and set(growth.joiner_slots()) <= free
            assert (await plan_of(api, job.id)).generation == 2  # the job trains on meanwhile
            await say_ready(api, job.id, growth)
            g3 = await wait_until(lambda: generation_is(api, job.id, 3), 5)
            assert (g3.dp, g3.pp) == (2, 2) and g3.switch_at_step > 6
            assert {(a.node, a.slot) for a in g2.workers} < {(a.node, a.slot) for a in g3.workers}
            await report_running(api, g3, step=g3.switch_at_step + 1, first_step_time=time.time())
            await wait_until(lambda: _recoveries_complete(api, job.id, 2), 5)
            causes = [r["cause"] for r in (await status_of(api, job.id)).recoveries]
            assert causes[0].startswith("worker-failed") and causes[1] == "grow"
            await asyncio.sleep(1.0)  # a few reconcile passes: no further plan, no further growth
            assert (await plan_of(api, job.id)).generation == 3
            assert (await growth_in(api, job.id, "COMMITTED")).id == growth.id
            for lease in leases:
                await api.etcd.revoke_lease(lease)

    run_async(main(), 60)
