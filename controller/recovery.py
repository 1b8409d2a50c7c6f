"""Elastic recovery, the control side: plan g+1 for failures, growth, drains and rebalances.

The leader's reconcile pass calls ``Recovery.reconcile_job`` for every active
job (controller/reconcile.py). It:

1. finds a failed worker (its agent reported the exit within milliseconds) or a
   lost node (lease expired) of the current plan -> computes plan g+1 with
   ``controller.replan.replan`` (the survivors alone where they can run without the
   free slots: step 4 adds those while the job trains) and writes it, the job status (RECOVERING, one
   pending recovery entry) and an event in ONE etcd transaction guarded by the
   plan key's revision (generation g; DESIGN principle 3). No plan possible
   (below ``min_workers``...) -> FAILED with the reason. A failure during a
   recovery re-plans from the latest plan.
2. completes a recovery entry once every rank of its generation has done a step
   there (RECOVERING -> RUNNING), from the workers' recovery records, and
   updates the Prometheus metrics.
3. drains: a node cordoned with reason ``drain`` that still runs workers of a
   RUNNING job -> plan g+1 without it at a step boundary (no step lost).
4. grows, in two phases: a RUNNING job below ``max_workers`` with free slots
   on ready, uncordoned nodes -> a growth record (PREPARING, with the tentative
   plan g+1; plan g unchanged). The agents start the new workers with it; they
   import, build and connect while the job trains on, and each writes a READY
   joiner record. Once all are ready -> plan g+1 with ``switch_at_step`` a few
   steps ahead (growth COMMITTED, same transaction): the survivors stall at the
   boundary only for the rendezvous and the state transfer, not for process
   start-up. A joiner that exits, a joiner node that leaves, a plan change, or
   ``RecoverySettings.growth_prepare_s`` without every joiner ready -> ABANDONED (agents stop
   the joiners), retried after a backoff (controller/recovery_decisions.py).

Entry points for other parts of the controller (the health loop, chaos, the
API); all are coroutines on the leader and return ``(done, reason)``:

* ``await recovery.request_replan(job_id, cause, lost_ranks=..., lost_nodes=..., detected_at=...)``
  - ranks to give up on *now* (a hung rank, an evicted straggler): plan g+1
  without them, switch now. Their agents stop the processes once they are out of
  the plan (they are not killed first: the hang detector may do that).
* ``await recovery.request_migration(job_id, ranks, cause, at_step=None)``
  - move ranks off their slots at a step boundary (a degrading GPU): plan g+1
  without them, ``switch_at_step`` = ``at_step`` or a few seconds of steps ahead.
* ``await recovery.request_drain(node, reason="drain")`` - the same
  as ``tenax nodes drain NODE``: cordon the node with reason ``drain``; the
  reconcile pass moves every job off it at a step boundary.
* ``await recovery.request_rebalance(job_id, shares, at_step=None)``
  - same workers and layout, new per-dp-rank sample shares (a straggler), at a
  step boundary.

All of them refuse (``(False, reason)``) on a replica that does not lead, for a
job that is not RUNNING/RECOVERING, or when the plan changed under them (the
transaction guard); none of them blocks for longer than the etcd timeouts.
The pure rules live in controller/recovery_decisions.py and controller/replan.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from controller import events, metrics
from controller.recovery_decisions import (
    CAPACITY_WAIT_S,
    GROWTH_PREPARE_TIMEOUT_S,
    Failure,
    fail_before_first_step,
    fail_permanently,
    plan_records,
    all_ranks_on_generation,
    cause_label,
    close_superseded,
    commit_plan,
    complete_recovery,
    end_growth,
    capacity_wait_start,
    wait_for_capacity,
    find_failure,
    free_slots_for,
    growth_decision,
    open_recovery,
    pending_recovery,
    rebalance_plan,
    should_drain,
    should_grow,
    start_growth,
    switch_step,
    without_slots,
)
from common.etcd import EtcdError, EtcdUnavailable
from controller import quarantine
from controller.handle import ControllerHandle
from controller.replan import ClusterView, drain, grow, replan
from controller.state import JobView, NodeSummary, jobs_from, nodes_from
from protos.plan import Plan
from protos.records import CordonRecord, GrowthRecord, JobEventRecord, JobStatusRecord

log = logging.getLogger("tenax.controller.recovery")

DURATION_PHASES = ("detection", "plan", "rebuild", "transfer", "total")


@dataclass(kw_only=True)
class RecoverySettings:
    growth_prepare_s: float = GROWTH_PREPARE_TIMEOUT_S
    """Longest a two-phase growth waits for its new workers to be ready before it is abandoned
    (seconds, > 0; ``tenax controller --growth-prepare-s``)."""
    quarantine: quarantine.QuarantineSettings = field(default_factory=quarantine.QuarantineSettings)
    """Cool-downs of slots where a worker failed, and when a slot or node is cordoned
    (``tenax controller --quarantine-*``, ``--slot-cordon-failures``, ``--node-cordon-failures``)."""

    survivors_first: bool = True
    """A failure's plan runs on the survivors alone when their layout fits memory and uses every
    one of them, and the two-phase growth adds the free slots while the job trains
    (``controller.replan.survivors_only``); off: free slots join the switch-now plan, and the
    survivors wait for the new processes to start (``tenax controller --no-survivors-first``)."""

    capacity_wait_s: float = CAPACITY_WAIT_S
    """Longest a job whose failure leaves too few workers for any layout waits, RECOVERING and
    saying so, for workers to come back (a lost node's agent restarting, a growth's new workers
    stopping, a slot's cool-down ending) before it is FAILED (seconds, >= 0)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.growth_prepare_s) and self.growth_prepare_s > 0):
            raise ValueError(f"growth_prepare_s: must be > 0 seconds, got {self.growth_prepare_s}")
        if not (math.isfinite(self.capacity_wait_s) and self.capacity_wait_s >= 0):
            raise ValueError(f"capacity_wait_s: must be >= 0 seconds, got {self.capacity_wait_s}")


class Recovery:
    """Writes plan generations for one controller (acts only while it leads)."""

    def __init__(self, handle: ControllerHandle, settings: RecoverySettings | None = None) -> None:
        self.c = handle
        self._lock = asyncio.Lock()
        """One plan write at a time (the reconcile pass and requests from other tasks)."""
        settings = settings or RecoverySettings()
        self.prepare_timeout_s = settings.growth_prepare_s
        self.capacity_wait_s = settings.capacity_wait_s
        self.survivors_first = settings.survivors_first
        self._short_since: dict[tuple[str, int], float] = {}
        """(job, plan generation) -> when a failure of it first found too few workers (seconds)."""
        """Longest a growth waits for its new workers to be ready before it is abandoned (seconds)."""
        self.quarantine = settings.quarantine
        """When a slot where a worker failed may be used again; when a slot or node is cordoned."""

    # ------------------------------------------------------------ public requests
    async def request_replan(self, job_id: str, cause: str, *, lost_ranks: Iterable[int] = (),
                             lost_nodes: Iterable[str] = (), detected_at: float | None = None,
                             generation: int | None = None) -> tuple[bool, str]:
        """Plan g+1 without ``lost_ranks`` / ``lost_nodes`` of the current plan, switching now.
        Their slots are quarantined as failures (controller/quarantine.py).

        ``detected_at``: when the caller saw the problem (unix seconds; default now), used
        as the failure time of the recovery record (detection_s = 0 from the controller's view).
        ``generation``: refuse unless the current plan is still that generation (ranks are
        renumbered by every plan: the caller's ranks would name other workers).
        """
        now = time.time()
        lost_ranks = sorted(int(r) for r in lost_ranks)
        failure = Failure(cause=cause, lost_ranks=frozenset(lost_ranks),
                          lost_nodes=frozenset(lost_nodes), failed_at=detected_at or now,
                          description=f"{cause}: ranks {lost_ranks} nodes {sorted(lost_nodes)}")
        job, why = self._active_job(job_id)
        if job is None:
            return False, why
        async with self._lock:
            job, why = self._active_job(job_id)  # the lock may have waited for another plan write
            if job is None:
                return False, why
            if generation is not None and job.plan.generation != generation:
                return False, f"job {job_id} is at plan generation {job.plan.generation}, not {generation}"
            return await self._recover(job, failure, now)

    async def request_migration(self, job_id: str, ranks: Iterable[int], cause: str = "migrate", *,
                                at_step: int | None = None) -> tuple[bool, str]:
        """Plan g+1 without ``ranks`` at a step boundary (their state is handed over first)."""
        now = time.time()
        job, why = self._active_job(job_id, phases=("RUNNING",))
        if job is None:
            return False, why
        async with self._lock:
            nodes = self._nodes()
            view = self._view(job, nodes, lost_ranks=frozenset(int(r) for r in ranks))
            plan, reason = replan(job.spec, job.plan, view, cause=cause, now=now)
            if plan is None:
                return False, reason
            at = at_step if at_step is not None else switch_step(job.progress.step, self._step_time(job))
            plan = dataclasses.replace(plan, switch_at_step=at, reason=f"{reason} at step {at}",
                                       extra={**plan.extra, "cause": cause})
            return await self._write_planned(job, plan, cause, now)

    async def request_drain(self, node: str, reason: str = "drain") -> tuple[bool, str]:
        """Cordon ``node`` for a drain; the reconcile pass moves jobs off it at a step boundary."""
        await self.c.etcd.put(self.c.keys.cordon(node), CordonRecord(time=time.time(), reason="drain").to_json())
        self.c.wake()
        return True, f"node {node} draining ({reason})"

    async def request_rebalance(self, job_id: str, shares: Sequence[int], at_step: int | None = None,
                                cause: str = "rebalance") -> tuple[bool, str]:
        """Plan g+1 with new sample shares (one per dp rank, summing to the global batch)."""
        now = time.time()
        job, why = self._active_job(job_id, phases=("RUNNING",))
        if job is None:
            return False, why
        async with self._lock:
            at = at_step if at_step is not None else switch_step(job.progress.step, self._step_time(job))
            plan, reason = rebalance_plan(job.plan, shares, at_step=at, now=now, cause=cause)
            if plan is None:
                return False, reason
            return await self._write_planned(job, plan, cause, now)

    # ------------------------------------------------------------ reconcile (leader)
    async def reconcile_job(self, job: JobView, nodes: dict[str, NodeSummary], now: float, *,
                            jobs_waiting: bool = False) -> bool:
        """One pass over one active job with a plan; True if it wrote something.
        ``jobs_waiting``: some job is PENDING (no growth then: it gets the free slots first)."""
        if job.plan is None or job.cancelled or not job.active:
            return False
        live = frozenset(n.id for n in nodes.values() if n.registered)
        async with self._lock:
            failure = find_failure(job.plan, job.workers, live, job.progress_ranks, now)
            if failure is not None:
                records = plan_records(job.plan, job.workers)
                errors = {rank: rec.cause or rec.last_error for rank, rec in records.items() if rec.failed}
                fatal = fail_permanently(job.plan, failure, job.workers) or \
                    fail_before_first_step(job.plan, failure, step=job.progress.step, errors=errors)
                if fatal is not None:
                    await self._set_status(job, phase="FAILED", message=fatal, now=now)
                    log.error("job %s FAILED: %s", job.id, fatal)
                    return True
                # written or not (a lost race re-plans next pass), the phase rules must not run on it
                await self._recover(job, failure, now, nodes=nodes)
                return True
            if await self._complete_if_settled(job, now):
                return True
            if await self._advance_growth(job, nodes, now):
                return True
            settled = open_recovery(job.status.recoveries, job.plan.generation) is None and \
                job.status.phase == "RUNNING"
            at = switch_step(job.progress.step, self._step_time(job))
            for node in sorted(n.id for n in nodes.values() if n.cordon is not None and n.cordon.reason == "drain"):
                ok, _ = should_drain(phase=job.status.phase, plan=job.plan, node=node, settled=settled, at_step=at,
                                     total_steps=job.spec.steps)
                if ok:
                    return await self._drain(job, node, nodes, now)
            return await self._maybe_grow(job, nodes, now, settled, jobs_waiting)

    # ------------------------------------------------------------ failures
    async def _recover(self, job: JobView, failure: Failure, now: float, *,
                       nodes: dict[str, NodeSummary] | None = None) -> tuple[bool, str]:
        nodes = nodes if nodes is not None else self._nodes()
        view = self._view(job, nodes, lost_ranks=failure.lost_ranks, lost_nodes=failure.lost_nodes)
        plan, reason = replan(job.spec, job.plan, view, cause=failure.cause, now=now,
                              survivors_first=self.survivors_first)
        # the why: node-lost events, and the root cause (a hang, an exception) over "worker-failed"
        lost = events.node_lost_events(failure, job.plan, step=job.progress.step, now=now)
        if plan is None:
            if job.growth is not None and job.growth.state == "PREPARING":
                # its new workers hold slots this recovery needs; the failure supersedes the growth
                await self._abandon_growth(job, job.growth, f"superseded by {failure.description}", now,
                                           backoff=False)
                return True, f"growth abandoned for the recovery from {failure.description}"
            # the first pass that found no layout: a failure's own time can be "now" on every pass
            for key in [k for k in self._short_since if k[0] == job.id and k[1] != job.plan.generation]:
                del self._short_since[key]
            since = self._short_since.setdefault((job.id, job.plan.generation), capacity_wait_start(
                failed_at=failure.failed_at, planned_at=float(job.plan.extra.get("planned_at", 0.0) or 0.0), now=now))
            wait, why = wait_for_capacity(failed_at=since, now=now, wait_s=self.capacity_wait_s)
            if wait:
                message = f"waiting for workers to recover from {failure.description} ({reason}); {why}"
                if job.status.message != message:
                    await self._set_status(job, phase="RECOVERING", message=message, now=now)
                    log.warning("job %s: %s", job.id, message)
                return False, message
            message = events.failed_message(failure, reason, job.plan, job.workers)
            if await self._set_status(job, phase="FAILED", message=message, now=now):
                await events.write_events(self.c, job.id, lost)
            log.error("job %s FAILED: %s", job.id, message)
            return True, message
        entry = pending_recovery(cause=events.root_cause(failure, job.plan, job.workers), old=job.plan, new=plan,
                                 at_step=job.progress.step,
                                 failed_at=failure.failed_at, seen_at=now, planned_at=time.time())
        message = f"recovering from {failure.description}: {reason}"
        lost_nodes = failure.lost_nodes
        dead = {(a.node, a.slot) for a in job.plan.workers if a.rank in failure.lost_ranks and a.node not in lost_nodes}
        extra, cordons = self._quarantine_after(job, nodes, now, failed=dead, lost_nodes=lost_nodes)
        plan = dataclasses.replace(plan, extra={**plan.extra, **extra})
        ok = await self._write_plan(job, plan, entry, phase="RECOVERING", message=message, quarantined=True)
        if ok:
            log.warning("job %s RECOVERING (generation %d): %s", job.id, plan.generation, message)
            await self._apply_cordons(job, plan.generation, cordons, nodes)
            await events.write_events(self.c, job.id, lost)
            return True, message
        return False, "the plan changed meanwhile (another writer); the next pass re-plans"

    # ------------------------------------------------------------ planned changes
    async def _drain(self, job: JobView, node: str, nodes: dict[str, NodeSummary], now: float) -> bool:
        view = self._view(job, nodes)
        at = switch_step(job.progress.step, self._step_time(job))
        plan, reason = drain(job.spec, job.plan, view, node=node, at_step=at, now=now)
        if plan is None:
            message = f"cannot drain {node}: {reason}"
            if job.status.message != message:
                await self._set_status(job, phase=job.status.phase, message=message, now=now)
                log.warning("job %s: %s", job.id, message)
            return False
        ok, _ = await self._write_planned(job, plan, f"drain {node}", now)
        return ok

    async def _maybe_grow(self, job: JobView, nodes: dict[str, NodeSummary], now: float, settled: bool,
                          jobs_waiting: bool) -> bool:
        """Phase 1 of a growth: the PREPARING record (the plan does not change yet)."""
        view = self._view(job, nodes, now=now)  # joined nodes, and slots whose quarantine is over
        free = sum(len(s) for s in view.free_slots.values())
        at = switch_step(job.progress.step, self._step_time(job))
        ok, _why = should_grow(phase=job.status.phase, plan=job.plan, max_workers=job.spec.max_workers,
                               free_slot_count=free, step=job.progress.step, total_steps=job.spec.steps,
                               at_step=at, jobs_waiting=jobs_waiting, settled=settled and all_ranks_on_generation(
                                   job.plan, job.progress_ranks, job.workers), growth=job.growth, now=now)
        if not ok:
            return False
        plan, reason = grow(job.spec, job.plan, view, at_step=-1, now=now)
        if plan is None:
            return False
        # carried like any plan of the job (``_write_plan`` does it for the others)
        plan = dataclasses.replace(plan, extra={**plan.extra, **self._quarantine_after(job, nodes, now)[0]})
        growth = start_growth(job.plan, plan, growth_id=f"g{plan.generation}-{uuid.uuid4().hex[:8]}", now=now,
                              previous=job.growth, timeout_s=self.prepare_timeout_s)
        ok = await self._put_guarded(job, {self.c.keys.job_growth(job.id): growth.to_json()})
        if ok:
            job.growth = growth
            log.info("job %s: preparing growth %s (attempt %d): %s; new workers %s", job.id, growth.id,
                     growth.attempt, reason, [f"{j['node']}/{j['slot']}" for j in growth.joiners])
        return ok

    async def _advance_growth(self, job: JobView, nodes: dict[str, NodeSummary], now: float) -> bool:
        """Phase 2 of a growth: commit it once every new worker is ready, or abandon it."""
        live = [n.id for n in nodes.values() if n.registered]
        cordoned = [n.id for n in nodes.values() if n.cordon is not None]
        decision, reason = growth_decision(growth=job.growth, plan=job.plan, joiners=job.joiners, live_nodes=live,
                                           cordoned=cordoned, now=now)
        if decision == "commit":
            at = switch_step(job.progress.step, self._step_time(job))
            if job.status.phase != "RUNNING" or at >= job.spec.steps:
                decision, reason = "abandon", (f"the job is {job.status.phase}" if job.status.phase != "RUNNING"
                                               else f"the job ends (step {job.spec.steps}) before step {at}")
            else:
                return await self._commit_growth(job, job.growth, at, reason, now)
        if decision in ("abandon", "withdraw"):
            return await self._abandon_growth(job, job.growth, reason, now, backoff=decision == "abandon")
        return False

    async def _commit_growth(self, job: JobView, growth: GrowthRecord, at: int, why: str, now: float) -> bool:
        plan = commit_plan(growth, at_step=at, now=now)
        prepare_s = float(plan.extra.get("prepare_s", 0.0))
        entry = pending_recovery(cause="grow", old=job.plan, new=plan, at_step=at, failed_at=now, seen_at=now,
                                 planned_at=time.time(), prepare_s=prepare_s)
        done = end_growth(growth, state="COMMITTED", reason=why, now=now)
        ok = await self._write_plan(job, plan, entry, phase=job.status.phase, message=plan.reason,
                                    extra_puts={self.c.keys.job_growth(job.id): done.to_json()})
        if not ok:
            return False
        job.growth = done
        log.info("job %s plan generation %d: %s (new workers ready in %.2f s)", job.id, plan.generation,
                 plan.reason, prepare_s)
        await self._forget_joiners(job.id)
        return True

    async def _abandon_growth(self, job: JobView, growth: GrowthRecord, why: str, now: float, *,
                              backoff: bool = True) -> bool:
        done = end_growth(growth, state="ABANDONED", reason=why, now=now, backoff=backoff)
        key = self.c.keys.job_growth(job.id)
        revision = self.c.cache.data.get(key, ("", 0))[1]
        if revision == 0 or not await self.c.etcd.put_if_revision(key, done.to_json(), revision):
            return False  # changed meanwhile: the next pass decides again
        job.growth = done
        log.warning("job %s: growth %s abandoned: %s (next attempt in %.0f s)", job.id, growth.id, why,
                    done.retry_after - now)
        try:  # informational (the record says it all): parts 2..9 of the generation's event keys
            await self._event(job.id, "note", {"generation": job.plan.generation,
                                               "message": f"growth {growth.id} abandoned: {why}"},
                              part=1 + min(growth.attempt, 8))
        except (EtcdError, EtcdUnavailable) as exc:
            log.debug("job %s: abandoned-growth event not written: %r", job.id, exc)
        await self._forget_joiners(job.id)
        return True

    async def _forget_joiners(self, job_id: str) -> None:
        """Joiner records matter only while a growth is prepared; best effort (a later attempt
        has another id, so a leftover record is never mistaken for a ready worker)."""
        try:
            await self.c.etcd.delete_prefix(self.c.keys.job_joiners(job_id))
        except (EtcdError, EtcdUnavailable) as exc:
            log.debug("job %s: joiner records not deleted: %r", job_id, exc)

    async def _write_planned(self, job: JobView, plan: Plan, cause: str, now: float) -> tuple[bool, str]:
        entry = pending_recovery(cause=cause, old=job.plan, new=plan, at_step=plan.switch_at_step,
                                 failed_at=now, seen_at=now, planned_at=time.time())
        ok = await self._write_plan(job, plan, entry, phase=job.status.phase, message=plan.reason)
        if ok:
            log.info("job %s plan generation %d: %s", job.id, plan.generation, plan.reason)
            return True, plan.reason
        return False, "the plan changed meanwhile (another writer)"

    # ------------------------------------------------------------ completion
    async def _complete_if_settled(self, job: JobView, now: float) -> bool:
        index = open_recovery(job.status.recoveries, job.plan.generation)
        if index is None:
            if job.status.phase == "RECOVERING" and all_ranks_on_generation(job.plan, job.progress_ranks,
                                                                           job.workers):
                await self._set_status(job, phase="RUNNING", now=now,
                                       message=f"plan generation {job.plan.generation} running")
                return True
            return False
        if not all_ranks_on_generation(job.plan, job.progress_ranks, job.workers):
            return False
        reports, first_steps = self._worker_reports(job)
        entry = complete_recovery(job.status.recoveries[index], reports, first_steps)
        recoveries = [dict(r) for r in job.status.recoveries]
        recoveries[index] = entry
        message = (f"recovered ({entry['cause']}) in {entry['total_s']:.2f} s, generation {job.plan.generation} "
                   f"dp={job.plan.dp}·pp={job.plan.pp}"
                   + (f"; survivors saw {entry['comm_error']}" if entry.get("comm_error") else ""))
        if await self._set_status(job, phase="RUNNING", message=message, now=now, recoveries=recoveries):
            record_metrics(job.id, entry)
            log.info("job %s: %s (detection %.3f plan %.3f rebuild %.3f transfer %.3f steps lost %d)", job.id,
                     message, entry["detection_s"], entry["plan_s"], entry["rebuild_s"], entry["transfer_s"],
                     entry["steps_lost"])
            await self._event(job.id, "recovery", entry)
            return True
        return False

    def _worker_reports(self, job: JobView) -> tuple[list[dict[str, Any]], list[float]]:
        """The ranks' recovery records and first-step times at the current generation, read from
        the extra keys the agent adds to each rank's progress record (agent/progress.py)."""
        reports: list[dict[str, Any]] = []
        first_steps: list[float] = []
        for a in job.plan.workers:
            raw = self.c.cache.get(self.c.keys.job_progress_rank(job.id, a.rank))
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            rec = data.get("recovery")
            if isinstance(rec, dict) and int(rec.get("new_generation", -1) or -1) == job.plan.generation:
                reports.append(rec)
            first = data.get("generation_first_step")
            if isinstance(first, dict) and first.get("generation") == job.plan.generation:
                try:
                    first_steps.append(float(first["time"]))
                except (KeyError, TypeError, ValueError):
                    pass
        return reports, first_steps

    # ------------------------------------------------------------ etcd writes
    async def _put_guarded(self, job: JobView, puts: dict[str, str]) -> bool:
        """``puts`` in one transaction, only if the plan is still the one ``job`` was read with."""
        plan_key = self.c.keys.job_plan(job.id)
        raw, guard = self.c.cache.data.get(plan_key, ("", 0))
        cached = self.c.cache.parse(plan_key, raw, Plan.from_json) if raw else None
        if guard == 0 or cached is None or cached.generation != job.plan.generation:
            return False
        return await self.c.etcd.put_many_if(plan_key, guard, puts)

    async def _write_plan(self, job: JobView, plan: Plan, entry: dict[str, Any], *, phase: str,
                          message: str, quarantined: bool = False,
                          extra_puts: dict[str, str] | None = None) -> bool:
        """Plan g+1, the status and an event (and ``extra_puts``) in one transaction guarded
        by plan g's revision. The job's quarantine records are carried over from plan g unless
        ``quarantined`` (the caller put the updated ones in the plan)."""
        keys = self.c.keys
        if not quarantined:
            plan = dataclasses.replace(plan, extra={**plan.extra, **self._quarantine_after(job, None, time.time())[0]})
        plan_key = keys.job_plan(job.id)
        raw, guard = self.c.cache.data.get(plan_key, ("", 0))
        cached = self.c.cache.parse(plan_key, raw, Plan.from_json) if raw else None
        if guard == 0 or cached is None or cached.generation != plan.generation - 1:
            return False  # computed from a plan that is no longer the latest: the next pass re-plans
        now = time.time()
        recoveries = close_superseded(job.status.recoveries) + [entry]
        status = JobStatusRecord(**{**job.status.to_dict(), "phase": phase, "message": message,
                                    "generation": plan.generation, "recoveries": recoveries, "updated": now})
        event = JobEventRecord(kind="plan", time=now, data={"generation": plan.generation, "reason": plan.reason,
                                                            "cause": entry["cause"]})
        ok = await self.c.etcd.put_many_if(plan_key, guard, {
            plan_key: plan.to_json(),
            keys.job_status(job.id): status.to_json(),
            keys.job_event(job.id, _event_seq(plan.generation, 0)): event.to_json(),
            **(extra_puts or {}),
        })
        if ok:
            job.plan, job.status = plan, status  # this pass's view stays consistent with what we wrote
            metrics.JOB_GENERATION.labels(job.id).set(plan.generation)
        return ok

    async def _set_status(self, job: JobView, *, phase: str, message: str, now: float,
                          recoveries: list[dict[str, Any]] | None = None) -> bool:
        fields = {**job.status.to_dict(), "phase": phase, "message": message, "updated": now}
        if recoveries is not None:
            fields["recoveries"] = recoveries
        status = JobStatusRecord(**fields)
        key = self.c.keys.job_status(job.id)
        revision = self.c.cache.data.get(key, ("", 0))[1]
        ok = await self.c.etcd.put_if_revision(key, status.to_json(), revision)
        if ok:
            job.status = status
        return ok

    async def _event(self, job_id: str, kind: str, data: dict[str, Any], part: int = 1) -> None:
        seq = _event_seq(int(data.get("generation", 0)), part)
        await self.c.etcd.put(self.c.keys.job_event(job_id, seq),
                              JobEventRecord(kind=kind, time=time.time(), data=data).to_json())

    # ------------------------------------------------------------ views
    def _active_job(self, job_id: str, phases: tuple[str, ...] = ("RUNNING", "RECOVERING")
                    ) -> tuple[JobView | None, str]:
        if not self.c.is_leader():
            return None, "this controller replica does not lead"
        job = jobs_from(self.c.cache).get(job_id)
        if job is None:
            return None, f"job {job_id!r} not found"
        if job.plan is None or job.status.phase not in phases:
            return None, f"job {job_id} is {job.status.phase}, not {' or '.join(phases)}"
        return job, ""

    def _nodes(self) -> dict[str, NodeSummary]:
        return nodes_from(self.c.cache, jobs_from(self.c.cache))

    def _view(self, job: JobView, nodes: dict[str, NodeSummary], *, lost_ranks: frozenset[int] = frozenset(),
              lost_nodes: frozenset[str] = frozenset(), now: float | None = None) -> ClusterView:
        live = {n.id: n for n in nodes.values() if n.registered}
        schedulable = {n.id: range(int(n.record.get("slots", 0) or 0)) for n in live.values() if n.cordon is None}
        used = {n.id: n.used for n in nodes.values()}
        gone = frozenset(lost_nodes) | frozenset(w.node for w in job.plan.workers if w.node not in live)
        # never a slot of this job in quarantine or cordoned for it: it could fail again, in a loop
        excluded = quarantine.excluded_slots(quarantine.records_from(job.plan.extra, settings=self.quarantine),
                                             now=time.time() if now is None else now,
                                             node_started=_node_started(nodes))
        free = without_slots(free_slots_for(schedulable, used), set(excluded))
        return ClusterView(lost_ranks=lost_ranks, lost_nodes=gone, free_slots=free,
                           store_addresses={n.id: str(n.record.get("store_address", ""))
                                            for n in live.values() if n.record.get("store_address")})

    # ------------------------------------------------------------ quarantine (controller/quarantine.py)
    def _quarantine_after(self, job: JobView, nodes: dict[str, NodeSummary] | None, now: float, *,
                          failed: Iterable[tuple[str, int]] = (), lost_nodes: Iterable[str] = ()
                          ) -> tuple[dict[str, Any], list[quarantine.Cordon]]:
        """The plan extra fields carrying the job's quarantine records (after ``failed`` slots
        and ``lost_nodes``, if any), and the cordons that decides."""
        nodes = nodes if nodes is not None else self._nodes()
        started = _node_started(nodes)
        records = quarantine.records_from(job.plan.extra, settings=self.quarantine)
        cordons: list[quarantine.Cordon] = []
        if failed or lost_nodes:
            records, cordons = quarantine.record_failures(
                records, slots=failed, lost_nodes=lost_nodes, now=now, settings=self.quarantine,
                node_started=started, cordoned_nodes=[n.id for n in nodes.values() if n.cordon is not None])
        return quarantine.plan_extra(records, now=now, settings=self.quarantine, node_started=started), cordons

    async def _apply_cordons(self, job: JobView, generation: int, cordons: Sequence[quarantine.Cordon],
                             nodes: dict[str, NodeSummary]) -> None:
        """Write what ``record_failures`` decided: a node's CordonRecord (never over an operator's
        cordon or drain), one job event listing the cordons, a metric and a log line. Best effort:
        the plan is written already, and its records keep the job off a cordoned slot anyway."""

        done: list[dict[str, Any]] = []
        for c in cordons:
            where = f"node {c.node}" if c.slot is None else f"slot {c.node}/{c.slot} (for job {job.id})"
            try:
                if c.slot is None:
                    record = CordonRecord(time=time.time(), reason=f"{quarantine.AUTO_CORDON_REASON}: {c.reason}")
                    if not await self.c.etcd.create(self.c.keys.cordon(c.node), record.to_json()):
                        log.info("job %s: %s already cordoned; not cordoned again", job.id, where)
                        continue
                    self.c.wake()
            except (EtcdError, EtcdUnavailable) as exc:
                log.error("job %s: cordon of %s not written (%s): %r", job.id, where, c.reason, exc)
                continue
            metrics.AUTO_CORDONS.labels("node" if c.slot is None else "slot").inc()
            log.warning("job %s: %s cordoned: %s", job.id, where, c.reason)
            done.append({"node": c.node, "slot": -1 if c.slot is None else c.slot, "reason": c.reason,
                         "message": f"{where} cordoned: {c.reason}"})
        if not done:
            return
        try:
            await self._event(job.id, "cordon", {"generation": generation, "cordons": done,
                                                 "message": "; ".join(d["message"] for d in done)},
                              part=_CORDON_EVENT_PART)
        except (EtcdError, EtcdUnavailable) as exc:
            log.error("job %s: cordon event not written: %r", job.id, exc)

    @staticmethod
    def _step_time(job: JobView) -> float:
        times = [p.step_time_s for p in job.progress_ranks.values() if p.step_time_s > 0]
        return max(times) if times else 0.0


def _node_started(nodes: dict[str, NodeSummary]) -> dict[str, float]:
    """When each registered node's agent started (a node that rejoined is usable at once)."""
    out: dict[str, float] = {}
    for n in nodes.values():
        if n.registered:
            try:
                out[n.id] = float(n.record.get("started", 0.0) or 0.0)
            except (TypeError, ValueError):
                continue
    return out


_CORDON_EVENT_PART = 9
"""The event listing the cordons decided with a plan generation (controller/quarantine.py)."""


def _event_seq(generation: int, part: int) -> int:
    """Event keys sort by generation: plan event (part 0), then its recovery (part 1), then
    notes about it (parts 2-9: abandoned growths; 5: a straggler; 9: cordons)."""
    return generation * 10 + part


def record_metrics(job_id: str, entry: dict[str, Any]) -> None:
    """Prometheus series for one completed recovery."""
    cause = cause_label(str(entry.get("cause", "")))
    metrics.RECOVERIES.labels(cause).inc()
    metrics.JOB_RECOVERIES.labels(job_id, cause).inc()
    for phase in DURATION_PHASES:
        value = float(entry.get(f"{phase}_s", 0.0) or 0.0)
        metrics.RECOVERY_DURATION.labels(phase).observe(value)
        metrics.JOB_LAST_RECOVERY.labels(job_id, phase).set(value)
    metrics.RECOVERY_MTTR.labels(job_id).set(float(entry.get("total_s", 0.0) or 0.0))
    lost = int(entry.get("steps_lost", 0) or 0)
    if lost:
        metrics.STEPS_LOST.labels(job_id).inc(lost)
