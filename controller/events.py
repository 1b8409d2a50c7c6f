"""The controller's side of job events (common/events.py holds the record and the writer).

* ``root_cause`` names what went wrong first for a recovery record's ``cause`` and a failed
  job's message: the cause the agent recorded with a kill (a hang), else the failing
  worker's last exception line, not the kill or exit that followed. Pure.
* ``hang_event`` / ``node_lost_events``: the evidence of a hang decision and of a lost node. Pure.
* ``EventRecorder``: a listener on the watched mirror (every replica) that turns changes of
  a job's keys into events: ``phase`` (status phase changes), ``plan`` (the first plan,
  written with the RUNNING status; later plans are written with their recovery entry,
  controller/recovery.py), ``growth`` (a growth prepared, committed or abandoned) and
  ``drain`` (a node a job runs on is cordoned for a drain). Every replica follows the
  changes; only the leader writes, each event once (its key derives from the etcd revision
  of the change, its time from the record). A change seen first at a load (a new leader)
  makes no event: its leader wrote it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Mapping

from common import events
from common.etcd import EtcdError, EtcdUnavailable, WatchEvent
from controller.handle import ControllerHandle
from controller.recovery_decisions import Failure, plan_records
from protos.plan import Plan, PlanError
from protos.records import (CordonRecord, GrowthRecord, JobEventRecord, JobStatusRecord, RecordError,
                            WorkerStatusRecord)

log = logging.getLogger("tenax.controller.events")


# ------------------------------------------------------------------ pure
def root_cause(failure: Failure, plan: Plan, workers: Mapping[int, WorkerStatusRecord]) -> str:
    """The recovery cause to record for ``failure``: a failed rank's recorded cause (``hang: rank
    1 made no progress for 4.1 s, stopped by SIGSTOP; killed``), else ``worker-failed: <what
    happened>; last error: <exception line>`` when the log had one, else ``failure.cause``."""
    records = plan_records(plan, workers)
    failed = [records[r] for r in sorted(failure.lost_ranks) if r in records and records[r].failed]
    for rec in failed:
        if rec.cause:
            return rec.cause
    for rec in failed:
        if rec.last_error:
            how = f"signal {rec.signal}" if rec.signal else f"exit code {rec.exit_code}"
            return f"{failure.cause}: rank {rec.rank} on {rec.node} {rec.state.lower()} ({how}); " \
                   f"last error: {rec.last_error}"
    return failure.cause


def failed_message(failure: Failure, reason: str, plan: Plan, workers: Mapping[int, WorkerStatusRecord]) -> str:
    """A failed job's message: why no plan fits, ending with the failing worker's root cause
    (its recorded cause, or its last exception line). Pure."""
    message = f"cannot recover from {failure.description}: {reason}"
    records = plan_records(plan, workers)
    for rec in (records[r] for r in sorted(failure.lost_ranks) if r in records and records[r].failed):
        if rec.cause:
            return f"{message}; cause: {rec.cause}"
        if rec.last_error:
            return f"{message}; last error: {rec.last_error}"
    return message


def hang_cause(rank: int, silent_s: float, stopped: bool | None) -> str:
    """The root cause of a hang, as the kill request carries it to the worker's exit report. Pure."""
    return f"hang: rank {rank} made no progress for {silent_s:.1f} s" + (", stopped by SIGSTOP" if stopped else "")


def hang_event(*, rank: int, node: str, slot: int, silent_s: float, timeout_s: float, step: int,
               generation: int, stopped: bool | None, reason: str, now: float,
               evidence: Mapping[str, Any] | None = None) -> JobEventRecord:
    """The ``hang`` event of a rank the health loop declared hung (it then asks for a kill).
    ``evidence``: what else was gathered before the kill (``flight_recorder``: the analysis of
    the ranks' Flight Recorder dumps, controller/flight.py). Pure."""
    seen = "; its process is stopped by a signal (SIGSTOP)" if stopped else ""
    return events.new_event(
        "hang", f"rank {rank} on {node} made no progress for {silent_s:.1f} s (timeout {timeout_s:.1f} s){seen}",
        now=now, step=step, action=f"kill rank {rank} (SIGKILL through its agent); the exit starts a recovery",
        data={"rank": rank, "ranks": [rank], "node": node, "slot": slot, "generation": generation,
              "silent_s": round(silent_s, 3), "timeout_s": round(timeout_s, 3), "last_step": step,
              "process_stopped": stopped, "decision": reason[:2000], "evidence": dict(evidence or {})})


def rendezvous_timeout_event(*, rank: int, node: str, slot: int, generation: int, deadline_s: float,
                             waited_s: float, reason: str, now: float) -> JobEventRecord:
    """The ``rendezvous-timeout`` event of a rank that never reached its generation's rendezvous
    (the health loop then re-plans without it and quarantines its slot). Pure."""
    return events.new_event(
        "rendezvous-timeout",
        f"rank {rank} on {node} slot {slot} did not reach the rendezvous of generation {generation} "
        f"within {deadline_s:.1f} s (waited {waited_s:.1f} s)",
        now=now, action=f"re-plan without rank {rank}; quarantine {node} slot {slot} as a failure",
        data={"rank": rank, "ranks": [rank], "node": node, "slot": slot, "generation": generation,
              "deadline_s": round(deadline_s, 3), "waited_s": round(waited_s, 3), "decision": reason[:2000]})


def node_lost_events(failure: Failure, plan: Plan, *, step: int, now: float) -> list[JobEventRecord]:
    """One ``node-lost`` event per node of ``failure`` (its lease expired). Pure."""
    out = []
    for node in sorted(failure.lost_nodes):
        ranks = sorted(a.rank for a in plan.workers if a.node == node)
        out.append(events.new_event(
            "node-lost", f"node {node} lost (agent lease expired): ranks {ranks} gone", now=now, step=step,
            action="re-plan without it", data={"node": node, "ranks": ranks, "generation": plan.generation,
                                               "last_heartbeat": failure.failed_at}))
    return out


def change_events(kind: str, rest: str, value: str, previous: Any, *, job: str) -> tuple[list[JobEventRecord], Any]:
    """Events for one change of a job key (``rest`` after ``P/jobs/<job>/``) given what was
    known before (``previous``: the last phase, growth state ...). Returns (events, new memory).
    Pure: times come from the records themselves, so every replica renders the same event."""
    if kind != "put":
        return [], previous
    try:
        if rest == "status":
            status = JobStatusRecord.from_json(value)
            if previous is None or status.phase == previous:
                return [], status.phase  # first sight (a load or a new job): PENDING is its submit
            return [events.new_event("phase", f"{previous} -> {status.phase}: {status.message}",
                                     now=status.updated or status.created,
                                     data={"from": previous, "to": status.phase, "generation": status.generation,
                                           "reason": status.message})], status.phase
        if rest == "growth":
            growth = GrowthRecord.from_json(value)
            state = (growth.id, growth.state)
            if state == previous:
                return [], previous
            joiners = [f"{n}/{s}" for n, s in growth.joiner_slots()]
            text = {"PREPARING": f"growth {growth.id} (attempt {growth.attempt}): preparing new workers on "
                                 f"{', '.join(joiners)}",
                    "COMMITTED": f"growth {growth.id} committed: {growth.reason}",
                    "ABANDONED": f"growth {growth.id} abandoned: {growth.reason}"}[growth.state]
            when = growth.started if growth.state == "PREPARING" else growth.ended
            return [events.new_event("growth", text, now=when or None, data={
                "id": growth.id, "state": growth.state, "attempt": growth.attempt, "joiners": joiners,
                "generation": growth.base_generation + 1, "reason": growth.reason})], state
    except (RecordError, PlanError, ValueError) as exc:
        log.debug("no event for %s of job %s: %s", rest, job, exc)
    return [], previous


def first_plan_event(plan: Plan, *, now: float) -> JobEventRecord:
    """The ``plan`` event of a job's first plan (the scheduler writes it with the RUNNING status). Pure."""
    workers = [f"{a.node}/{a.slot}" for a in plan.workers]
    return events.new_event("plan", f"plan generation {plan.generation}: {plan.world_size} workers "
                                    f"dp={plan.dp}·pp={plan.pp} on {', '.join(workers)}",
                            now=now, action="start the workers",
                            data={"generation": plan.generation, "reason": plan.reason, "workers": workers})


def drain_events(node: str, cordon: CordonRecord, jobs_on_node: Iterable[str]) -> list[tuple[str, JobEventRecord]]:
    """(job, event) for each active job with workers on ``node`` when it is cordoned for a drain. Pure."""
    if cordon.reason != "drain":
        return []
    return [(job, events.new_event("drain", f"node {node} drained: its workers move at a step boundary",
                                   now=cordon.time, action="plan without the node at a step boundary",
                                   data={"node": node})) for job in sorted(jobs_on_node)]


# ------------------------------------------------------------------ the recorder
class EventRecorder:
    """Turns mirrored key changes into job events (see the module docstring)."""

    def __init__(self, handle: ControllerHandle) -> None:
        self.c = handle
        self._memory: dict[tuple[str, str], Any] = {}
        self._queue: asyncio.Queue[tuple[str, str, JobEventRecord]] = asyncio.Queue(maxsize=10000)
        handle.cache.add_listener(self.on_change)

    def on_change(self, ev: WatchEvent) -> None:
        """Every replica keeps the memory (a new leader starts from it); only the leader writes."""
        keys = self.c.keys
        parsed = keys.parse_job_key(ev.key)
        if parsed is not None:
            job, rest = parsed
            if rest not in ("status", "growth"):
                return
            if ev.kind == "delete":
                self._memory.pop((job, rest), None)
                return
            previous = self._memory.get((job, rest))
            made, self._memory[(job, rest)] = change_events(ev.kind, rest, ev.value, previous, job=job)
            if rest == "status" and previous == "PENDING" and self._memory[(job, rest)] == "RUNNING":
                plan = self._plan(job)  # written in the same transaction, just before the status
                if plan is not None and plan.generation == 1 and made:
                    made.insert(0, first_plan_event(plan, now=made[-1].time))
            for i, event in enumerate(made):
                self._put(job, f"r{ev.mod_revision}-{i}", event)
            return
        if ev.key.startswith(keys.cordons()) and ev.kind == "put":
            node = ev.key[len(keys.cordons()):]
            try:
                cordon = CordonRecord.from_json(ev.value)
            except RecordError:
                return
            on_node = set()
            for key in self.c.cache.prefixed(keys.jobs()):
                found = keys.parse_job_key(key)
                if found is not None and found[1] == "plan" and self._memory.get((found[0], "status")) in \
                        ("RUNNING", "RECOVERING"):
                    plan = self._plan(found[0])
                    if plan is not None and any(a.node == node for a in plan.workers):
                        on_node.add(found[0])
            for job, event in drain_events(node, cordon, on_node):
                self._put(job, f"r{ev.mod_revision}", event)

    def _plan(self, job: str) -> Plan | None:
        key = self.c.keys.job_plan(job)
        raw = self.c.cache.get(key)
        return self.c.cache.parse(key, raw, Plan.from_json) if raw else None

    def _put(self, job: str, suffix: str, event: JobEventRecord) -> None:
        if self.c.is_leader() and not self._queue.full():
            self._queue.put_nowait((job, suffix, event))

    async def run(self) -> None:
        """Write queued events (each once: ``events.emit(once=True)``); a write etcd refuses is
        logged and dropped, an unavailable etcd is retried a few times."""
        while True:
            job, suffix, event = await self._queue.get()
            for attempt in range(5):
                try:
                    await events.emit(self.c.etcd, self.c.keys, job, event, suffix=suffix, once=True)
                    break
                except EtcdUnavailable as exc:
                    log.debug("event of job %s not written yet (attempt %d): %r", job, attempt + 1, exc)
                    await asyncio.sleep(0.5 * (attempt + 1))
                except EtcdError as exc:
                    log.warning("%s event of job %s dropped: etcd refused it: %s", event.kind, job, exc)
                    break


async def write_events(handle: ControllerHandle, job: str, made: Iterable[JobEventRecord]) -> None:
    """Best effort: an event etcd does not take is logged, never fails the decision it describes."""
    for event in made:
        try:
            await events.emit(handle.etcd, handle.keys, job, event)
        except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
            log.warning("%s event of job %s not written: %r", event.kind, job, exc)
