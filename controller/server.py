"""The Tenax controller: asyncio gRPC server, leader election, scheduler loop, /metrics.

The RPC handlers live in controller/api.py and controller/chaos.py (their shared
plumbing in controller/rpc.py), the etcd mirror and views in controller/state.py,
the pure decisions in controller/decisions.py, the election in
controller/leader.py, the leader's loops in controller/reconcile.py,
controller/recovery.py and controller/health_loop.py. This module wires them:
each gets the narrow ``ControllerHandle`` (controller/handle.py), never the
``Controller``, and no other module imports this one.

Replica roles (any number of replicas share one etcd):

* Every replica serves every RPC. Reads come from its watched mirror of etcd
  (``controller.state.ClusterCache``) or straight from etcd (GetJob).
* Mutating RPCs (SubmitJob, CancelJob, Cordon/Uncordon/DrainNode) only record
  the user's intent in etcd with one atomic write, so any replica may accept
  them: no forwarding, and a client never needs to know who leads.
* Decisions (scheduling, writing plans, job phase changes, the node registry)
  are taken only by the leader, elected through an etcd lease
  (``controller.leader``). A standby takes over within the lease TTL.

The health service reports ``""`` (the process) SERVING whenever it runs, and
``tenax.v1.Leader`` SERVING only on the leader (also the
``tenax_controller_is_leader`` gauge).

Run: ``tenax controller --etcd http://127.0.0.1:2379 --tls-cert ... --tls-key ...`` (its flags are in
cli/controller.py); it prints one JSON line with its gRPC and metrics addresses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from common.etcd import Etcd, EtcdError, EtcdTls, EtcdUnavailable, WatchEvent
from common.retry import Backoff
from controller import metrics
from controller.api import JobService, NodeService
from controller.chaos import ChaosService
from controller.events import EventRecorder
from controller.goodput import GoodputTracker
from controller.handle import ControllerHandle
from controller.health_loop import HealthLoop, HealthSettings
from controller.leader import LeaderElector
from controller.reconcile import JobReconciler
from controller.recovery import Recovery, RecoverySettings
from controller.retention import RetentionSettings
from controller.security import SecuritySettings, ServerSecurity
from controller.state import ClusterCache, jobs_from, nodes_from
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import DEFAULT_PREFIX, Keys
from protos.records import JOB_PHASES, LeaderRecord, NodeRecord, RecordError, RegistryRecord

log = logging.getLogger("tenax.controller")

LEADER_SERVICE = "tenax.v1.Leader"
GRPC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(kw_only=True)
class ControllerSettings:
    """One controller replica, whole (``tenax controller`` builds it from its flags: cli/controller.py)."""

    etcd: str
    """etcd endpoint(s), ``http://host:port``."""
    listen: str = "127.0.0.1:0"
    """gRPC listen address host:port; port 0 asks the kernel for one."""
    advertise: str = ""
    """Address clients should use (host:port); default: the listen host and bound port."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port; 0 = ephemeral, -1 = off."""
    metrics_host: str = "127.0.0.1"
    """Bind address of the /metrics HTTP server."""
    id: str = ""
    """Replica id; default hostname-pid."""
    lease_ttl_s: int = 5
    """Leader lease TTL (seconds): a standby leads at most this long after the leader dies."""
    prefix: str = DEFAULT_PREFIX
    """etcd key prefix of the cluster."""
    reconcile_interval_s: float = 0.5
    """Leader loop period (seconds) when nothing wakes it earlier."""
    security: SecuritySettings | None = None
    """TLS, authentication, limits, audit; None serves plaintext without authentication
    (in-process tests only; the command line asks for it explicitly)."""
    etcd_tls: EtcdTls | None = None
    """Client TLS for an https:// etcd endpoint; None for http://."""
    health: HealthSettings = field(default_factory=HealthSettings)
    """The leader's hang, straggler and degraded-GPU detection (controller/health_loop.py)."""
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    """Plan generations g+1 (controller/recovery.py)."""
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    """When finished jobs are deleted and unplaceable ones fail (controller/retention.py)."""

    def validate(self) -> None:
        """Raises ValueError naming the field (``lease_ttl_s: ...``)."""
        if self.lease_ttl_s < 1:
            raise ValueError(f"lease_ttl_s: must be >= 1 seconds, got {self.lease_ttl_s}")
        if not 0.01 <= self.reconcile_interval_s <= 60:
            raise ValueError(f"reconcile_interval_s: must be in [0.01, 60] seconds, got {self.reconcile_interval_s}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"metrics_port: must be -1..65535, got {self.metrics_port}")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen: must be host:port, got {self.listen!r}")
        try:
            Keys(self.prefix)
        except ValueError as exc:
            raise ValueError(f"prefix: {exc}") from None
        self.retention.validate()
        if not self.id:
            self.id = f"{socket.gethostname()}-{os.getpid()}"


# ------------------------------------------------------------------ controller
class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        settings.validate()
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.etcd = Etcd(settings.etcd, tls=settings.etcd_tls)
        self.security: ServerSecurity | None = None
        """TLS, authentication, limits and audit of the API, when settings.security is given."""
        self.cache = ClusterCache(self.etcd, self.keys)
        self.address = ""
        self.metrics_address = ""
        self.elector: LeaderElector | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._tasks: list[asyncio.Task] = []
        self._leader_tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._registry_queue: asyncio.Queue[tuple[str, str, float, str]] = asyncio.Queue()
        self._job_series: set[str] = set()
        self.handle = ControllerHandle(etcd=self.etcd, keys=self.keys, cache=self.cache, wake=self._wake.set,
                                       is_leader=lambda: self.is_leader)
        """What the loops and services may touch (controller/handle.py)."""
        self.recovery = Recovery(self.handle, settings.recovery)
        """Plan generations g+1: failures, growth, drains, rebalances (controller/recovery.py)."""
        self.reconciler = JobReconciler(self.handle, self.recovery, self._wake,
                                        interval_s=settings.reconcile_interval_s, retention=settings.retention)
        """The leader's job loop: scheduling and phases (controller/reconcile.py)."""
        self.cache.add_listener(self._on_change)
        self.goodput = GoodputTracker(self.handle)
        """ETTR per job, for the API and the gauges (controller/goodput.py)."""
        self.events = EventRecorder(self.handle)
        """Phase, first-plan, growth and drain job events from key changes (controller/events.py)."""

    @property
    def is_leader(self) -> bool:
        return bool(self.elector and self.elector.is_leader)

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self._connect_etcd()
        if self.settings.security is not None:
            self.security = ServerSecurity(self.etcd, self.keys, self.settings.security)
            server = grpc.aio.server(interceptors=self.security.interceptors(),
                                     options=self.security.server_options())
        else:
            log.warning("controller API without TLS or authentication (no security settings)")
            server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
            ])
        pb_grpc.add_JobServiceServicer_to_server(JobService(self.handle, self.goodput), server)
        pb_grpc.add_NodeServiceServicer_to_server(NodeService(self.handle), server)
        # admin-only fault injection (who may call it: controller/auth.py)
        pb_grpc.add_ChaosServiceServicer_to_server(ChaosService(self.handle), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        served = ["JobService", "NodeService", "ChaosService"] + (["AuditService"] if self.security is not None else [])
        reflection.enable_server_reflection(
            tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in served
                  if name in pb.DESCRIPTOR.services_by_name)
            + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        if self.security is not None:
            self.security.add_services(server)
        host = self.settings.listen.rpartition(":")[0]
        if self.security is not None:
            port = self.security.add_port(server, self.settings.listen)
        else:
            port = server.add_insecure_port(self.settings.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await server.start()
        self._server = server
        self.address = self.settings.advertise or f"{host}:{port}"
        if self.settings.metrics_port >= 0:
            http, _thread = start_http_server(self.settings.metrics_port, self.settings.metrics_host,
                                              registry=metrics.REGISTRY)
            self._metrics_http = http
            self.metrics_address = f"{self.settings.metrics_host}:{http.server_port}"
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(LEADER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.CONTROLLER_IS_LEADER.set(0)
        self.elector = LeaderElector(
            self.etcd, self.keys, LeaderRecord(id=self.settings.id, address=self.address),
            ttl_s=self.settings.lease_ttl_s, on_elected=self._elected, on_demoted=self._demoted)
        self._tasks = [
            asyncio.create_task(self.cache.run(), name="cache"),
            asyncio.create_task(self.elector.run(), name="election"),
            asyncio.create_task(self._gauges_loop(), name="gauges"),
            asyncio.create_task(self.events.run(), name="events"),
        ]

    async def _connect_etcd(self) -> None:
        backoff = Backoff(0.2, 2.0)
        deadline = time.monotonic() + 60
        while True:
            try:
                await self.etcd.connect()
                return
            except EtcdUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("etcd not reachable yet (retrying): %s", exc)
                await backoff.sleep()

    async def stop(self) -> None:
        tasks = self._leader_tasks + self._tasks
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not gather: a task that swallows its cancellation (inside a
            # client library) must not hold the shutdown forever.
            _done, pending = await asyncio.wait(tasks, timeout=3.0)
            if pending:
                log.warning("%d task(s) did not stop in time: %s", len(pending),
                            ", ".join(t.get_name() for t in pending))
        if self.elector is not None:
            await self.elector.resign()
        metrics.CONTROLLER_IS_LEADER.set(0)
        if self._server:
            await self._server.stop(grace=1.0)
        if self.security is not None:  # refused calls counted since the last window: written, not lost
            try:
                await asyncio.wait_for(self.security.audit.flush_refused(), 5.0)
            except asyncio.TimeoutError:
                log.error("counted refused calls not written to the audit log in time (etcd slow or down)")
        if self._metrics_http:
            # shutdown() blocks until the HTTP thread's loop notices; keep it off the event loop.
            try:
                await asyncio.wait_for(asyncio.to_thread(self._metrics_http.shutdown), 2.0)
            except asyncio.TimeoutError:
                log.warning("metrics HTTP server did not stop in time")
            self._metrics_http.server_close()
        await self.etcd.close()

    async def _elected(self) -> None:
        self._registry_queue = asyncio.Queue()  # changes seen while a standby are covered by the sync
        metrics.CONTROLLER_IS_LEADER.set(1)
        await self.health.set(LEADER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._leader_tasks = [
            asyncio.create_task(self.reconciler.run(), name="reconcile"),
            asyncio.create_task(self._registry_loop(), name="registry"),
            # hang, straggler and degraded-GPU detection; a fresh loop (and memory) per term as leader
            asyncio.create_task(HealthLoop(self.handle, self.recovery, self.settings.health).run(), name="health"),
        ]

    async def _demoted(self, reason: str) -> None:
        metrics.CONTROLLER_IS_LEADER.set(0)
        await self.health.set(LEADER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self._leader_tasks:
            task.cancel()
        await asyncio.gather(*self._leader_tasks, return_exceptions=True)
        self._leader_tasks = []

    # -------------------------------------------------------------- change feed
    def _on_change(self, ev: WatchEvent) -> None:
        keys = self.keys
        node = keys.parse_node_key(ev.key)
        if node is not None:
            if self.is_leader:
                # time.time() here is the controller's detection time of a lost lease.
                self._registry_queue.put_nowait((ev.kind, node, time.time(), ev.value))
            self._wake.set()
            return
        parsed = keys.parse_job_key(ev.key)
        if parsed and not parsed[1].startswith(("progress/", "telemetry/")):
            self._wake.set()
        elif ev.key.startswith(keys.cordons()):
            self._wake.set()

    # -------------------------------------------------------------- leader: node registry
    async def _registry_loop(self) -> None:
        """Persist what the leader learns about nodes: first registration, and the
        moment a lease expired (so a vanished node is listed NOT_READY, with its time)."""
        await self.cache.synced.wait()
        await self._sync_registry()
        backoff = Backoff(0.1, 2.0)
        while True:
            kind, node, when, value = await self._registry_queue.get()
            while True:
                try:
                    await self._record_node(kind, node, when, value)
                    backoff.reset()
                    break
                except EtcdUnavailable as exc:
                    log.warning("registry write for %s failed (retrying): %s", node, exc)
                    await backoff.sleep()
                except EtcdError as exc:  # permanent: retrying the same write cannot help
                    log.error("registry %s of node %s skipped: etcd refused it: %s", kind, node, exc)
                    break

    async def _sync_registry(self) -> None:
        now = time.time()
        live = {self.keys.parse_node_key(k): v for k, v in self.cache.prefixed(self.keys.nodes()).items()}
        live.pop(None, None)
        for key in list(self.cache.prefixed(self.keys.registry())):
            node = key[len(self.keys.registry()):]
            if node not in live:
                await self._record_node("delete", node, now, "")
        for node, value in live.items():
            await self._record_node("put", node, now, value)

    async def _record_node(self, kind: str, node: str, when: float, value: str) -> None:
        key = self.keys.node_registry(node)
        old_raw = self.cache.get(key)
        old = None
        if old_raw is not None:
            try:
                old = RegistryRecord.from_json(old_raw)
            except RecordError as exc:
                self.cache.warn_malformed(key, str(exc))
        if kind == "delete":
            if old is None or old.lost_at is not None:
                return
            log.warning("node %s NOT_READY: agent lease expired", node)
            await self.etcd.put(key, RegistryRecord(node=old.node, first_seen=old.first_seen, lost_at=when).to_json())
            return
        try:
            record = NodeRecord.from_json(value).to_dict()
        except RecordError as exc:
            self.cache.warn_malformed(self.keys.node(node), str(exc))
            return
        if old is not None and old.lost_at is None and old.node == record:
            return
        if old is None or old.lost_at is not None:
            log.info("node %s READY (%s slots)", node, record.get("slots"))
        await self.etcd.put(key, RegistryRecord(node=record, first_seen=old.first_seen if old else when).to_json())

    # -------------------------------------------------------------- gauges (every replica)
    async def _gauges_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.update_gauges()
                await self.goodput.refresh(jobs_from(self.cache), time.time())
            except Exception:
                log.exception("updating gauges failed")

    def update_gauges(self) -> None:
        jobs = jobs_from(self.cache)
        nodes = nodes_from(self.cache, jobs)
        for phase in JOB_PHASES:
            metrics.JOBS.labels(phase).set(sum(1 for j in jobs.values() if j.status.phase == phase))
        for state in ("READY", "NOT_READY", "CORDONED"):
            metrics.NODES.labels(state).set(sum(1 for n in nodes.values() if n.state == state))
        for condition in ("HEALTHY", "DEGRADED", "FAILED"):
            metrics.NODES_BY_CONDITION.labels(condition).set(
                sum(1 for n in nodes.values() if n.registered and n.record.get("condition", "HEALTHY") == condition))
        active = set()
        for job in jobs.values():
            if not job.active:
                continue
            active.add(job.id)
            p = job.progress
            metrics.JOB_STEP.labels(job.id).set(p.step)
            if p.loss is not None:
                metrics.JOB_LOSS.labels(job.id).set(p.loss)
            metrics.JOB_TOKENS_PER_SECOND.labels(job.id).set(p.tokens_per_s)
            metrics.JOB_GENERATION.labels(job.id).set(job.plan.generation if job.plan else 0)
            metrics.JOB_WORKERS.labels(job.id).set(job.plan.world_size if job.plan else 0)
            if p.time:
                metrics.JOB_LAST_PROGRESS.labels(job.id).set(p.time)
            metrics.JOB_RECOVERABLE_STEP_LAG.labels(job.id).set(max(p.step - p.recoverable_step, 0))
            # age ~ steps at risk x step time (the ranks report steps, not when a snapshot completed)
            step_time = max((r.step_time_s for r in job.progress_ranks.values()), default=0.0)
            metrics.JOB_RECOVERABLE_AGE.labels(job.id).set(max(p.step - p.recoverable_step, 0) * step_time)
            for phase in JOB_PHASES:
                metrics.JOB_PHASE.labels(job.id, phase).set(1 if job.status.phase == phase else 0)
        for gone in self._job_series - active:
            metrics.forget_job(gone)
        self._job_series = active


# ------------------------------------------------------------------ entry point
STOP_TIMEOUT_S = 10.0
"""Longest a graceful stop may take (resign, drain RPCs, close etcd) before the process just exits."""


async def serve(settings: ControllerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before anything a supervisor could interrupt
        loop.add_signal_handler(sig, stop.set)
    controller = Controller(settings)
    try:
        await controller.start()
        print(json.dumps({"controller": controller.address, "metrics": controller.metrics_address,
                          "id": settings.id, "pid": os.getpid()}), flush=True)
        await stop.wait()
    finally:
        log.info("controller %s stopping", settings.id)
        stopping = asyncio.ensure_future(controller.stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_S)
        if not done:
            # Something ignores cancellation; exit anyway (the lease expires by itself).
            log.error("controller %s did not stop within %.0f s; exiting", settings.id, STOP_TIMEOUT_S)
            logging.shutdown()
            os._exit(1)
