"""Helpers for the security tests: an API server running in a background event loop.

The server (and its etcd client) live in their own thread and event loop, so a
test can use plain blocking gRPC stubs (and hypothesis, which is synchronous)
against it. Everything started is stopped by ``ServerThread.stop``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from controller import auth, convert
from common.etcd import Etcd
from controller.security import SecuritySettings, ServerSecurity
from controller.tls import DevPki, ensure_dev_pki
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.records import CancelRecord, CordonRecord, JobStatusRecord
from common.spec import SpecError

CALL_TIMEOUT_S = 10.0
JOB_METHODS = pb.DESCRIPTOR.services_by_name["JobService"].methods
NODE_METHODS = pb.DESCRIPTOR.services_by_name["NodeService"].methods


class ServerThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine on it and waits (with a timeout)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="secured-api", daemon=True)
        self._thread.start()

    def call(self, coro: Awaitable, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        async def cancel_leftovers():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        try:
            self.call(cancel_leftovers(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()


# ------------------------------------------------------------------ fake services
class FakeJobs(pb_grpc.JobServiceServicer):
    """A minimal JobService that writes to etcd like the real one (spec + status + owner in one txn)."""

    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.keys = keys

    async def SubmitJob(self, request, context):
        try:
            spec = convert.spec_from_proto(request.spec)
        except SpecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {exc}")
        job_id = f"{spec.name}-{secrets.token_hex(3)}"
        now = time.time()
        k = self.keys
        await self.etcd.put_many_if(k.job_spec(job_id), 0, {
            k.job_spec(job_id): json.dumps(spec.to_dict()),
            k.job_status(job_id): JobStatusRecord(phase="PENDING", created=now, updated=now).to_json(),
            k.job_owner(job_id): auth.owner_name(),
        })
        return pb.Job(id=job_id, spec=request.spec)

    async def _exists(self, job_id: str, context) -> None:
        if not job_id or "/" in job_id or await self.etcd.get(self.keys.job_spec(job_id)) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id[:80]!r} not found")

    async def GetJob(self, request, context):
        await self._exists(request.job_id, context)
        return pb.Job(id=request.job_id)

    async def ListJobs(self, request, context):
        ids = {self.keys.parse_job_key(kv.key)[0] for kv in await self.etcd.get_prefix(self.keys.jobs())}
        return pb.ListJobsResponse(jobs=[pb.Job(id=i) for i in sorted(ids)])

    async def CancelJob(self, request, context):
        await self._exists(request.job_id, context)
        await self.etcd.put(self.keys.job_cancel(request.job_id), CancelRecord(time=time.time()).to_json())
        return pb.Job(id=request.job_id)

    async def WatchJob(self, request, context):
        await self._exists(request.job_id, context)
        yield pb.JobEvent(job_id=request.job_id, phase=pb.PENDING)

    async def GetJobMetrics(self, request, context):
        await self._exists(request.job_id, context)
        return pb.GetJobMetricsResponse()


class FakeNodes(pb_grpc.NodeServiceServicer):
    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.keys = keys

    async def ListNodes(self, request, context):
        return pb.ListNodesResponse()

    async def _cordon(self, request, context, present: bool):
        node = request.node_id
        if not node or "/" in node or await self.etcd.get(self.keys.node(node)) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {node[:80]!r} not found")
        if present:
            await self.etcd.put(self.keys.cordon(node), CordonRecord(time=time.time(), reason="test").to_json())
        else:
            await self.etcd.delete(self.keys.cordon(node))
        return pb.NodeInfo(id=node)

    async def CordonNode(self, request, context):
        return await self._cordon(request, context, True)

    async def DrainNode(self, request, context):
        return await self._cordon(request, context, True)

    async def UncordonNode(self, request, context):
        return await self._cordon(request, context, False)


# ------------------------------------------------------------------ the secured API
@dataclass
class SecuredApi:
    """A running API server with the security interceptor, on loopback (fake services or the real controller)."""

    thread: ServerThread
    etcd: Etcd
    keys: Keys
    security: ServerSecurity
    address: str
    pki: DevPki
    shutdown: Callable[[], Awaitable[None]]
    """Stops the server and what it started (runs on the server's loop)."""
    tokens: dict[str, str] = field(default_factory=dict)
    """name -> token, made by ``make_token``."""

    def run(self, coro: Awaitable, timeout_s: float = 30.0) -> Any:
        return self.thread.call(coro, timeout_s)

    def make_token(self, name: str, role: str) -> str:
        token, _ = self.run(self.security.tokens.create(name, role, operator=auth.operator_identity()))
        self.tokens[name] = token
        return token

    def channel(self, *, token: str | None = None, client_cert: str | None = None,
                tls_override=None) -> grpc.Channel:
        """A blocking channel; ``client_cert`` names a dev client certificate (mTLS)."""
        from controller.tls import sync_channel

        settings = tls_override or self.pki.client_tls(client_cert)
        channel = sync_channel(self.address, settings)
        return grpc.intercept_channel(channel, auth.TokenClientInterceptor(token)) if token else channel

    def audit(self, *, token_changes: bool = False) -> list:
        """Audit records, newest first; those of token management (``make_token``'s own) only if asked."""
        # a call is audited just after its reply went out: wait until the log stops growing
        records, deadline = self.run(self.security.audit.newest(100_000)), time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.15)
            again = self.run(self.security.audit.newest(100_000))
            if len(again) == len(records):
                break
            records = again
        return [r for r in records if token_changes or not r.method.startswith(auth.TOKEN_AUDIT_METHOD)]

    def etcd_keys(self, prefix: str | None = None) -> list[str]:
        return self.run(self.etcd.keys_prefix(prefix or self.keys.prefix + "/"))

    def stop(self) -> None:
        try:
            self.thread.call(self.shutdown(), 30)
        finally:
            self.thread.stop()


def start_secured_api(etcd_url: str, state_dir: Path, settings: SecuritySettings | None = None, *,
                      build_services: Callable[[grpc.aio.Server, Etcd, Keys], None] | None = None,
                      prefix: str = "/tenax") -> SecuredApi:
    """Start a TLS API server (fake Job/Node services unless ``build_services``) with a dev PKI."""
    pki = ensure_dev_pki(state_dir, clients={"admin": "admin", "carol": "submitter", "norole": "",
                                             "viewer-cert": "viewer"})
    settings = settings or SecuritySettings(tls=pki.server_tls(mutual=False))
    thread = ServerThread()
    keys = Keys(prefix)

    async def start():
        etcd = Etcd(etcd_url)
        await etcd.connect()
        security = ServerSecurity(etcd, keys, settings)
        server = grpc.aio.server(interceptors=security.interceptors(), options=security.server_options())
        if build_services:
            build_services(server, etcd, keys)
        else:
            pb_grpc.add_JobServiceServicer_to_server(FakeJobs(etcd, keys), server)
            pb_grpc.add_NodeServiceServicer_to_server(FakeNodes(etcd, keys), server)
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        security.add_services(server)
        port = security.add_port(server, "127.0.0.1:0")
        await server.start()
        return etcd, security, server, port

    try:
        etcd, security, server, port = thread.call(start())
    except BaseException:
        thread.stop()
        raise

    async def shutdown():
        await server.stop(None)
        await etcd.close()

    return SecuredApi(thread=thread, etcd=etcd, keys=keys, security=security, address=f"127.0.0.1:{port}",
                      pki=pki, shutdown=shutdown)


def start_real_controller(etcd_url: str, state_dir: Path, settings: SecuritySettings | None = None,
                          **controller: Any) -> SecuredApi:
    """The real controller (controller/server.py) with ``settings``, leading, on loopback;
    ``controller`` overrides ControllerSettings fields (say ``retention=RetentionSettings(...)``)."""
    from controller.server import Controller, ControllerSettings

    pki = ensure_dev_pki(state_dir, clients={"admin": "admin", "carol": "submitter", "norole": "",
                                             "viewer-cert": "viewer"})
    settings = settings or SecuritySettings(tls=pki.server_tls(mutual=False))
    thread = ServerThread()
    overrides = controller

    async def start():
        controller = Controller(ControllerSettings(**{
            "etcd": etcd_url, "lease_ttl_s": 2, "reconcile_interval_s": 0.1, "metrics_port": -1,
            "security": settings, **overrides}))
        await controller.start()
        deadline = time.monotonic() + 20
        while not (controller.is_leader and controller.cache.synced.is_set()):
            if time.monotonic() > deadline:
                await controller.stop()
                raise TimeoutError("controller did not lead in 20 s")
            await asyncio.sleep(0.05)
        return controller

    try:
        controller = thread.call(start())
    except BaseException:
        thread.stop()
        raise
    return SecuredApi(thread=thread, etcd=controller.etcd, keys=controller.keys, security=controller.security,
                      address=controller.address, pki=pki, shutdown=controller.stop)


def tiny_spec(name: str = "tiny") -> pb.JobSpec:
    """A valid one-worker spec."""
    return pb.JobSpec(name=name, steps=2, global_batch_size=2, micro_batch_size=1,
                      parallelism=pb.Parallelism(dp=1, pp=1), resources=pb.Resources(workers=1, device="cpu"))


def rpc_code(fn: Callable[[], Any]) -> grpc.StatusCode:
    """The status code of a blocking call (OK if it returned)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
