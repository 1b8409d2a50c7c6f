"""The gRPC services of the controller: JobService and NodeService.

Handlers translate between the wire (generated types, via controller.convert)
and the cluster's keys in etcd, through the narrow ``ControllerHandle``
(controller/handle.py: etcd, the key layout, the watched mirror). Mutating calls
only record intent in etcd with one atomic write, so every replica serves them;
see controller/server.py for the replica roles.

Errors map to status codes in one place (controller/rpc.py): SpecError and
oversized or malformed requests -> INVALID_ARGUMENT (naming the field), unknown
ids -> NOT_FOUND, etcd down -> UNAVAILABLE (retry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from typing import Any, AsyncIterator

import grpc

from common import events
from common.etcd import WatchEvent
from controller import convert
from controller.auth import owner_name
from controller.goodput import GoodputTracker
from controller.handle import ControllerHandle
from controller.rpc import RpcAbort, checked_job_id, checked_node_id, streaming, unary
from controller.state import JobView, jobs_from, nodes_from, read_job, step_metrics
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.plan import Plan
from protos.records import TERMINAL_PHASES, CancelRecord, CordonRecord, JobStatusRecord, ProgressRecord

log = logging.getLogger("tenax.controller")


async def job_or_404(handle: ControllerHandle, job_id: str) -> JobView:
    job = await read_job(handle.etcd, handle.keys, checked_job_id(job_id), handle.cache.warn_malformed)
    if job is None:
        raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} not found")
    return job


# ------------------------------------------------------------------ services
class JobService(pb_grpc.JobServiceServicer):
    def __init__(self, handle: ControllerHandle, goodput: GoodputTracker | None = None) -> None:
        self.c = handle
        self.goodput = goodput or GoodputTracker(handle)
        """ETTR per job (controller/goodput.py)."""

    @unary
    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.Job:
        spec = convert.spec_from_proto(request.spec)  # SpecError -> INVALID_ARGUMENT, nothing written
        k = self.c.keys
        now = time.time()
        status = JobStatusRecord(phase="PENDING", message="submitted", created=now, updated=now)
        owner = owner_name()  # '' when the server runs without authentication
        for _attempt in range(5):
            job_id = f"{spec.name[:70]}-{secrets.token_hex(3)}"
            puts = {k.job_spec(job_id): json.dumps(spec.to_dict(), sort_keys=True),
                    k.job_status(job_id): status.to_json()}
            if owner:  # lets a submitter cancel its own jobs (controller/auth.py)
                puts[k.job_owner(job_id)] = owner
            if await self.c.etcd.put_many_if(k.job_spec(job_id), 0, puts):
                break
        else:
            raise RpcAbort(grpc.StatusCode.ABORTED, "could not allocate a unique job id, retry")
        kv = await self.c.etcd.get(k.job_status(job_id))
        if kv:
            await self.c.cache.wait_for_revision(kv.mod_revision)
        log.info("job %s submitted (%d workers)", job_id, spec.resources.workers)
        return convert.job_to_proto(JobView(id=job_id, spec=spec, status=status))

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        job = await job_or_404(self.c, request.job_id)
        msg = convert.job_to_proto(job)
        msg.status.goodput.CopyFrom(convert.goodput_to_proto(await self.goodput.get(job)))
        return msg

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        unknown = [p for p in request.phases if p not in pb.JobPhase.values()]
        if unknown:  # found by tests/security/test_security_fuzz.py: was INTERNAL
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"phases: unknown job phase {unknown[0]}")
        wanted = {convert.phase_name(p) for p in request.phases}
        jobs = sorted(jobs_from(self.c.cache).values(), key=lambda j: (j.status.created, j.id))
        out = pb.ListJobsResponse()
        for j in jobs:
            if not wanted or j.status.phase in wanted:
                msg = out.jobs.add()
                msg.CopyFrom(convert.job_to_proto(j))
                g = self.goodput.cached(j)  # no etcd read per listed job: what the gauges loop read
                if g is not None:
                    msg.status.goodput.CopyFrom(convert.goodput_to_proto(g))
        return out

    @unary
    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        job = await job_or_404(self.c, request.job_id)
        if job.active:
            rev = await self.c.etcd.put(self.c.keys.job_cancel(job.id), CancelRecord(time=time.time()).to_json())
            await self.c.cache.wait_for_revision(rev)
            job.cancelled = True
            job.status = JobStatusRecord(**{**job.status.to_dict(), "message": "cancel requested"})
        return convert.job_to_proto(job)

    @streaming
    async def WatchJob(self, request: pb.WatchJobRequest, context) -> AsyncIterator[pb.JobEvent]:
        job_id = checked_job_id(request.job_id)
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue(maxsize=10000)
        prefix = self.c.keys.job(job_id)

        def listen(ev: WatchEvent) -> None:
            if ev.key.startswith(prefix) and not queue.full():
                queue.put_nowait(ev)

        self.c.cache.add_listener(listen)
        try:
            job = await job_or_404(self.c, job_id)
            feed = _EventFeed(job_id)
            timeline = _Timeline(self.c, job_id)
            for event in feed.initial(job):
                yield event
            for event in await timeline.poll():
                yield event
            while not feed.done:
                try:
                    ev = await asyncio.wait_for(queue.get(), TIMELINE_POLL_S)
                except asyncio.TimeoutError:
                    ev = None
                if ev is not None:
                    for event in feed.on_change(self.c.keys, ev):
                        yield event
                if timeline.due() or feed.done:
                    if feed.done:  # the last phase's entry is written just after the status
                        await asyncio.sleep(TIMELINE_POLL_S / 2)
                    for event in await timeline.poll():
                        yield event
        finally:
            self.c.cache.remove_listener(listen)

    @unary
    async def GetJobMetrics(self, request: pb.GetJobMetricsRequest, context) -> pb.GetJobMetricsResponse:
        job = await job_or_404(self.c, request.job_id)
        steps = await step_metrics(self.c.etcd, self.c.keys, job.id, request.since_step)
        return pb.GetJobMetricsResponse(steps=[convert.step_to_proto(s) for s in steps])

    @unary
    async def ListJobEvents(self, request: pb.ListJobEventsRequest, context) -> pb.ListJobEventsResponse:
        """The job's timeline (common/events.py), oldest first; the newest ``limit`` only."""
        job_id = checked_job_id(request.job_id)
        if request.limit < 0 or not math.isfinite(request.since_time):
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be >= 0; since_time: a finite number")
        found = await events.read_events(self.c.etcd, self.c.keys, job_id, limit=request.limit,
                                         since_time=request.since_time)
        if not found:
            await job_or_404(self.c, job_id)  # no events yet, or no such job
        return pb.ListJobEventsResponse(events=[convert.event_to_proto(e) for e in found])


TIMELINE_POLL_S = 0.5
"""How often a WatchJob stream looks for new timeline entries (they are not in the mirror)."""


class _Timeline:
    """The job's timeline entries (common/events.py) for a WatchJob stream: each once, in order."""

    def __init__(self, handle: ControllerHandle, job_id: str) -> None:
        self.c = handle
        self.job_id = job_id
        self.since = 0.0
        self.seen: set[tuple[float, str, str]] = set()
        self.polled = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.polled >= TIMELINE_POLL_S

    async def poll(self) -> list[pb.JobEvent]:
        self.polled = time.monotonic()
        # a little before the newest entry seen: entries are written by several writers, not in time order
        found = await events.read_events(self.c.etcd, self.c.keys, self.job_id, limit=events.MAX_EVENTS_READ,
                                         since_time=max(self.since - 30.0, 0.0))
        out = []
        for e in found:
            identity = (e.time, e.kind, events.describe(e))
            if identity in self.seen:
                continue
            self.seen.add(identity)
            self.since = max(self.since, e.time)
            out.append(pb.JobEvent(job_id=self.job_id, time=e.time, entry=convert.event_to_proto(e)))
        return out


class _EventFeed:
    """Turns a job's key changes into JobEvents (phase, plan, recovery, progress)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.phase = ""
        self.generation = 0
        self.recoveries = 0
        self.step = -1
        self.loss: float | None = None
        self.done = False

    def _event(self, **kw: Any) -> pb.JobEvent:
        return pb.JobEvent(job_id=self.job_id, time=time.time(), **kw)

    def initial(self, job: JobView) -> list[pb.JobEvent]:
        events = self._status(job.status)
        if job.plan:
            events += self._plan(job.plan)
        for rank_progress in job.progress_ranks.values():
            events += self._progress(rank_progress)
        return events

    def _status(self, status: JobStatusRecord) -> list[pb.JobEvent]:
        events = []
        for rec in status.recoveries[self.recoveries:]:
            events.append(self._event(recovery=convert.recovery_to_proto(rec)))
        self.recoveries = max(self.recoveries, len(status.recoveries))
        if status.phase != self.phase:
            self.phase = status.phase
            events.append(self._event(phase=pb.JobPhase.Value(status.phase)))
            self.done = status.phase in TERMINAL_PHASES
        return events

    def _plan(self, plan: Plan) -> list[pb.JobEvent]:
        if plan.generation == self.generation:
            return []
        self.generation = plan.generation
        return [self._event(plan=convert.plan_to_proto(plan))]

    def _progress(self, p: ProgressRecord) -> list[pb.JobEvent]:
        if p.loss is not None:
            self.loss = p.loss
        if p.step <= self.step:
            return []
        self.step = p.step
        return [self._event(progress=pb.StepMetrics(
            step=p.step, loss=self.loss if self.loss is not None else 0.0, generation=p.generation,
            time=p.time, step_time_s=p.step_time_s, tokens_per_s=p.tokens_per_s))]

    def on_change(self, keys: Keys, ev: WatchEvent) -> list[pb.JobEvent]:
        if ev.kind != "put":
            return []
        parsed = keys.parse_job_key(ev.key)
        if not parsed:
            return []
        rest = parsed[1]
        try:
            if rest == "status":
                return self._status(JobStatusRecord.from_json(ev.value))
            if rest == "plan":
                return self._plan(Plan.from_json(ev.value))
            if rest.startswith("progress/"):
                return self._progress(ProgressRecord.from_json(ev.value))
        except ValueError as exc:  # malformed value: already logged by the mirror's readers; skip it
            log.debug("WatchJob %s skips %s: %s", self.job_id, ev.key, exc)
        return []


class NodeService(pb_grpc.NodeServiceServicer):
    def __init__(self, handle: ControllerHandle) -> None:
        self.c = handle

    def _nodes(self) -> dict:
        return nodes_from(self.c.cache, jobs_from(self.c.cache), with_health=True)

    def _node_or_404(self, node_id: str):
        node = self._nodes().get(checked_node_id(node_id))
        if node is None:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"node {node_id!r} not found")
        return node

    @unary
    async def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[convert.node_to_proto(n) for n in self._nodes().values()])

    async def _cordon(self, node_id: str, reason: str) -> pb.NodeInfo:
        node = self._node_or_404(node_id)
        record = CordonRecord(time=time.time(), reason=reason)
        rev = await self.c.etcd.put(self.c.keys.cordon(node.id), record.to_json())
        await self.c.cache.wait_for_revision(rev)
        return convert.node_to_proto(self._node_or_404(node.id))

    @unary
    async def CordonNode(self, request: pb.NodeRequest, context) -> pb.NodeInfo:
        return await self._cordon(request.node_id, "cordon")

    @unary
    async def DrainNode(self, request: pb.NodeRequest, context) -> pb.NodeInfo:
        # Drain = cordon with reason "drain" (the intent, in etcd); the leader then moves every
        # job off the node with plan g+1 at a step boundary (controller/recovery.py).
        return await self._cordon(request.node_id, "drain")

    @unary
    async def UncordonNode(self, request: pb.NodeRequest, context) -> pb.NodeInfo:
        node = self._node_or_404(request.node_id)
        await self.c.etcd.delete(self.c.keys.cordon(node.id))
        await self.c.cache.wait_for_revision(await self.c.cache.current_revision())
        return convert.node_to_proto(self._node_or_404(node.id))


