"""The leader's job reconcile loop: schedule PENDING jobs, move jobs between phases.

Runs on the leader only (controller/server.py starts it on election). Every
``interval_s``, or as soon as a change wakes it (a node, a cordon, a job key
other than progress and telemetry), it takes one pass over the active jobs,
oldest first: ``Recovery.reconcile_job`` (controller/recovery.py) handles
failures, growth, drains and recovery completion; otherwise the pure rules of
controller/decisions.py decide the phase, and a PENDING job is scheduled when
its placement fits. Every write is guarded (compare-and-swap on the plan or the
status key), so a deposed leader cannot overwrite a newer decision.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.etcd import EtcdError, EtcdUnavailable
from common.retry import Backoff
from controller import metrics
from controller.decisions import JobState, NodeView, build_plan, job_phase, schedule
from controller.handle import ControllerHandle
from controller.recovery import Recovery
from controller.retention import RetentionSettings, RetentionSweeper, unplaceable_decision, unplaceable_reason
from controller.state import JobView, jobs_from, nodes_from
from protos.records import TERMINAL_PHASES, JobStatusRecord

log = logging.getLogger("tenax.controller")


class JobReconciler:
    def __init__(self, handle: ControllerHandle, recovery: Recovery, wakeup: asyncio.Event, *,
                 interval_s: float, retention: RetentionSettings | None = None) -> None:
        self.c = handle
        self.retention = (retention or RetentionSettings()).validate()
        self.sweeper = RetentionSweeper(handle, self.retention)
        """Deletes finished jobs after their retention (controller/retention.py)."""
        self.recovery = recovery
        self.wakeup = wakeup
        """Set (through ``handle.wake``) when something changed that a pass should see now."""
        self.interval_s = interval_s
        """Longest time between two passes (seconds)."""

    async def run(self) -> None:
        await self.c.cache.synced.wait()
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self.wakeup.clear()
            try:
                await self.reconcile_once()
                backoff.reset()
            except EtcdUnavailable as exc:
                log.warning("reconcile: etcd unavailable (will retry): %s", exc)
                await backoff.sleep()
            except EtcdError as exc:  # permanent for that request: the next pass decides afresh
                log.error("reconcile pass skipped: etcd refused a request: %s", exc)
                await asyncio.sleep(self.interval_s)
            except Exception:  # a bug in one pass must not kill the leader loop
                log.exception("reconcile pass failed")
                await asyncio.sleep(self.interval_s)
            await asyncio.sleep(0.05)  # coalesce bursts of changes

    async def reconcile_once(self) -> None:
        now = time.time()
        jobs = jobs_from(self.c.cache)
        await self.sweeper.maybe_sweep(jobs.values(), now)
        if not any(job.active for job in jobs.values()):
            return  # idle: no node view to build (it matters at thousands of nodes)
        nodes = nodes_from(self.c.cache, jobs)
        live = frozenset(n.id for n in nodes.values() if n.registered)
        used = {n.id: set(n.used) for n in nodes.values()}
        cluster_slots = sum(int(n.record.get("slots", 0) or 0) for n in nodes.values() if n.registered)
        # Only a job the cluster could hold holds back growth: one that needs more slots than
        # exist would otherwise stop every other job from growing for as long as it waits.
        waiting = any(j.status.phase == "PENDING" and unplaceable_reason(_world(j), cluster_slots) is None
                      for j in jobs.values())
        for job in sorted(jobs.values(), key=lambda j: (j.status.created, j.id)):
            if not job.active:
                continue
            if await self.recovery.reconcile_job(job, nodes, now, jobs_waiting=waiting):
                # it wrote plan g+1 or a phase: the slots it took are no longer free for the next job
                nodes = nodes_from(self.c.cache, jobs)
                used = {n.id: set(n.used) for n in nodes.values()}
                continue
            state = JobState(phase=job.status.phase, cancelled=job.cancelled, plan=job.plan,
                             workers=job.workers, live_nodes=live, progress=job.progress_ranks)
            phase, reason = job_phase(state, now)
            if phase == "PENDING":
                never = unplaceable_decision(_world(job), cluster_slots, job.status.created, now,
                                             self.retention.unplaceable_fail_after_s)
                if never is None:
                    await self._schedule(job, nodes, used, now)
                elif never[0] == "FAILED":
                    await self._set_phase(job, "FAILED", never[1], now)
                elif job.status.message != never[1]:
                    await self._write_status(job, JobStatusRecord(**{**job.status.to_dict(), "message": never[1],
                                                                      "updated": now}))
            elif phase != job.status.phase:
                await self._set_phase(job, phase, reason, now)

    async def _schedule(self, job: JobView, nodes: dict, used: dict[str, set[int]], now: float) -> None:
        views = [NodeView(id=n.id, slots=int(n.record.get("slots", 0) or 0), ready=n.registered,
                          cordoned=n.cordon is not None, used_slots=frozenset(used.get(n.id, ())),
                          store_address=str(n.record.get("store_address", "")))
                 for n in nodes.values()]
        placement, reason = schedule(job.spec, views)
        if placement is None:
            if job.status.message != reason:
                await self._write_status(job, JobStatusRecord(**{**job.status.to_dict(), "message": reason,
                                                                  "updated": now}))
            return
        store_address = next(v.store_address for v in views if v.id == placement[0].node)
        plan = build_plan(job_id=job.id, spec=job.spec, placement=placement, store_address=store_address)
        status = JobStatusRecord(**{**job.status.to_dict(), "phase": "RUNNING", "generation": plan.generation,
                                    "message": reason, "updated": now})
        keys = self.c.keys
        ok = await self.c.etcd.put_many_if(keys.job_plan(job.id), 0, {
            keys.job_plan(job.id): plan.to_json(),
            keys.job_status(job.id): status.to_json(),
        })
        if ok:
            log.info("job %s scheduled: %s", job.id, reason)
            for slot in placement:
                used.setdefault(slot.node, set()).add(slot.slot)

    async def _set_phase(self, job: JobView, phase: str, reason: str, now: float) -> None:
        status = JobStatusRecord(**{**job.status.to_dict(), "phase": phase, "message": reason, "updated": now})
        if await self._write_status(job, status):
            log.info("job %s %s -> %s: %s", job.id, job.status.phase, phase, reason)
            if phase in TERMINAL_PHASES:
                metrics.forget_job(job.id)  # the gauges loop drops its own note of the job on its next pass

    async def _write_status(self, job: JobView, status: JobStatusRecord) -> bool:
        """Compare-and-swap on the status key, so a deposed leader cannot overwrite a newer decision."""
        key = self.c.keys.job_status(job.id)
        revision = self.c.cache.data.get(key, ("", 0))[1]
        return await self.c.etcd.put_if_revision(key, status.to_json(), revision)


def _world(job: JobView) -> int:
    return job.spec.parallelism.dp * job.spec.parallelism.pp
