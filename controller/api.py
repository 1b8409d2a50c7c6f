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
import contextlib
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
from common.layout import partition_for_spec
from common.spec import JobSpec
from controller.auth import active_jobs_limit, owner_name
from controller.goodput import GoodputTracker
from controller.limits import jobs_per_user_problem
from controller.security import active_jobs_lookup
from controller.handle import ControllerHandle
from controller.rpc import RpcAbort, checked_job_id, checked_node_id, checked_request_id, streaming, unary
from controller.state import JobView, jobs_from, nodes_from, read_job, step_metrics
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.plan import Plan
from protos.records import TERMINAL_PHASES, CancelRecord, CordonRecord, JobStatusRecord, ProgressRecord

log = logging.getLogger("tenax.controller")


ANONYMOUS_SUBMITTER = "-"
"""Whose request ids a server without authentication keeps (a name no identity can have)."""
DEFAULT_PAGE_SIZE = 500
"""Jobs per ListJobs reply when the caller does not say: ~1 KiB each, far below gRPC's 4 MiB."""
MAX_PAGE_SIZE = 1000
"""Most jobs per ListJobs reply."""
PLAN_MATH_DEADLINE_S = 5.0
"""Longest the layer partition of a submitted spec may take (seconds, off the event loop)."""


def list_page_size(requested: int) -> int:
    """Jobs per ListJobs reply for a requested ``page_size``. Pure."""
    return DEFAULT_PAGE_SIZE if requested <= 0 else min(requested, MAX_PAGE_SIZE)


def job_order(job: JobView) -> tuple[float, str]:
    """ListJobs order: oldest first, ties by id."""
    return (job.status.created, job.id)


def page_token(job: JobView) -> str:
    """The token for the page after ``job``: its place in the order (opaque to clients)."""
    return f"{job.status.created!r}/{job.id}"


def parse_page_token(token: str) -> tuple[float, str] | None:
    """None for the first page; RpcAbort(INVALID_ARGUMENT) for a token no server made."""
    if not token:
        return None
    created, sep, job_id = token.partition("/")
    try:
        value = float(created)
    except ValueError:
        value = float("nan")
    if not sep or value != value or not job_id:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"page_token: not a token from this server: {token[:80]!r}")
    return (value, job_id)


async def plan_math_in_time(spec: JobSpec) -> None:
    """Compute (and remember, common/layout.py) the spec's layer partition in a thread, with a
    deadline: CPU-heavy plan math never runs on the event loop that answers health checks
    and keeps the leader's lease. The spec's upper bounds keep it to milliseconds."""
    try:
        await asyncio.wait_for(asyncio.to_thread(partition_for_spec, spec.model, spec.parallelism.pp),
                               PLAN_MATH_DEADLINE_S)
    except TimeoutError:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"model: planning {spec.model.layers} layers over pp={spec.parallelism.pp} stages "
                       f"takes over {PLAN_MATH_DEADLINE_S:g} s; use fewer layers or stages") from None


class UserLocks:
    """One asyncio lock per submitter, so one replica's submits by a user never race each other
    (the etcd transaction catches races between replicas); a lock lives while it is in use."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str):
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users <= 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


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
        self._submit_locks = UserLocks()

    @unary
    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.Job:
        spec = convert.spec_from_proto(request.spec)  # SpecError -> INVALID_ARGUMENT, nothing written
        request_id = checked_request_id(request.request_id)
        k = self.c.keys
        owner = owner_name()  # '' when the server runs without authentication
        request_key = k.submit_request(owner or ANONYMOUS_SUBMITTER, request_id) if request_id else ""
        if request_key and (job := await self._job_of_request(request_key)) is not None:
            return convert.job_to_proto(job)  # a retry: the job its first attempt made
        await plan_math_in_time(spec)
        limit = active_jobs_limit() if owner else None
        async with self._submit_locks.hold(owner):
            for _attempt in range(5):
                now = time.time()
                status = JobStatusRecord(phase="PENDING", message="submitted", created=now, updated=now)
                job_id = f"{spec.name[:70]}-{secrets.token_hex(3)}"
                guards = {k.job_spec(job_id): 0}
                puts = {k.job_spec(job_id): json.dumps(spec.to_dict(), sort_keys=True),
                        k.job_status(job_id): status.to_json()}
                if owner:  # lets a submitter cancel its own jobs (controller/auth.py)
                    puts[k.job_owner(job_id)] = owner
                if limit is not None:
                    # Count and create in one transaction: the quota key's revision is read
                    # before counting and rewritten by the create, so a racing submit (another
                    # replica) makes this txn fail and count again.
                    quota = await self.c.etcd.get(k.user_quota(owner))
                    guards[k.user_quota(owner)] = quota.mod_revision if quota else 0
                    active = await active_jobs_lookup(self.c.etcd, k)(owner)
                    problem = jobs_per_user_problem(active, limit)
                    if problem:
                        raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
                    puts[k.user_quota(owner)] = job_id
                if request_key:
                    guards[request_key] = 0
                    puts[request_key] = job_id
                if await self.c.etcd.put_many_guarded(guards, puts):
                    break
                if request_key and (job := await self._job_of_request(request_key)) is not None:
                    return convert.job_to_proto(job)  # a concurrent retry won
            else:
                raise RpcAbort(grpc.StatusCode.ABORTED, "could not allocate a unique job id, retry")
        kv = await self.c.etcd.get(k.job_status(job_id))
        if kv:
            await self.c.cache.wait_for_revision(kv.mod_revision)
        log.info("job %s submitted (%d workers)", job_id, spec.resources.workers)
        return convert.job_to_proto(JobView(id=job_id, spec=spec, status=status))

    async def _job_of_request(self, request_key: str) -> JobView | None:
        kv = await self.c.etcd.get(request_key)
        if kv is None:
            return None
        return await read_job(self.c.etcd, self.c.keys, kv.value, self.c.cache.warn_malformed)

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
        size = list_page_size(request.page_size)
        after = parse_page_token(request.page_token)
        jobs = sorted((j for j in jobs_from(self.c.cache).values() if not wanted or j.status.phase in wanted),
                      key=job_order)
        page = [j for j in jobs if after is None or job_order(j) > after][:size + 1]
        more = len(page) > size
        page = page[:size]
        out = pb.ListJobsResponse(next_page_token=page_token(page[-1]) if more else "")
        for j in page:
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


