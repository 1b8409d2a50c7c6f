"""`tenax agent`: one per host. Registers the node, serves the rendezvous store,
publishes telemetry, and runs the workers that plans put on this node.

Tasks of a running agent (all in one asyncio loop)::

    registration   NodeInfo under a lease (TTL, refresh every TTL/3, re-register when lost)
    telemetry      psutil + NVML every few seconds -> Keys.node_health (under the lease), gauges,
                   node condition (HEALTHY/DEGRADED/FAILED) -> NodeInfo when it changes
    jobs watch     Keys.jobs(): plans naming this node -> Supervisor.apply_plan; cancel -> kill;
                   growths naming this node -> Supervisor.apply_growth (start the new workers
                   before the plan switches; stop them if the growth is abandoned)
    supervisor     worker processes, their exits (reported < 100 ms), progress relays
    http           /metrics, /healthz, /logs/<job>/<rank>?offset=N

Worker state machine: see agent/supervisor.py. On SIGTERM/SIGINT the agent
stops its workers (SIGTERM, then SIGKILL), reports them KILLED and revokes its
lease (the node is NOT_READY at once). If it is killed outright, the kernel
kills its workers (parent-death signal) and the lease expires after the TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import metrics
from agent.chaos import start_agent_tasks
from agent.decisions import LocalWorker
from agent.http import AgentHttp
from agent.registration import Registration
from agent.retrylog import FailureLog
from agent.slots import slot_devices
from agent.store import RendezvousStore
from agent.supervisor import Supervisor
from agent.telemetry import export_gauges, health_record, new_xids, node_condition, open_gpu_source, sample_host
from common import events, tokens
from common.etcd import Etcd, EtcdError, EtcdTls, EtcdUnavailable, parse_endpoint
from common.retry import Backoff
from protos.keys import DEFAULT_PREFIX, Keys
from protos.plan import Plan, PlanError
from protos.records import (TERMINAL_PHASES, GrowthRecord, JobStatusRecord, NodeRecord, WorkerStatusRecord,
                            parse_or_none)

log = logging.getLogger("agent")


@dataclass(kw_only=True)
class AgentSettings:
    etcd: str
    """etcd endpoints, ``http://host:port[,...]``."""
    node_id: str
    """Unique node name (no '/'); default: the hostname."""
    slots: int | None = None
    """Worker slots; None: from the GPUs NVML finds (agent/slots.py), or ``cpu_slots`` on a host without GPUs."""
    cpu_slots: int = 1
    """Slots on a host where NVML finds no GPU (and ``slots`` is None)."""
    gpus_per_slot: int = 1
    """GPUs each slot gets (slot i -> GPUs i*N .. i*N+N-1)."""
    slot_devices: str = ""
    """Explicit slot -> GPU map, ``0;0;1;1`` (slots may share a GPU); "" = from the GPUs found."""
    lease_ttl_s: int = 5
    """Node lease TTL (seconds); the lease is refreshed every TTL/3."""
    work_dir: Path
    """Per-node directory for launch files, logs, metrics files and job run dirs."""
    http_host: str = "127.0.0.1"
    http_port: int = 0
    """HTTP port for /metrics, /healthz and /logs (0: ephemeral)."""
    advertise_host: str = ""
    """Host other machines use to reach this agent (HTTP and store); default: http_host, or the
    hostname when http_host is a wildcard address."""
    etcd_prefix: str = DEFAULT_PREFIX
    """Cluster key prefix in etcd (protos.keys.Keys)."""
    telemetry_interval_s: float = 3.0
    """Seconds between telemetry samples."""
    kill_grace_s: float = 5.0
    """Seconds between SIGTERM and SIGKILL when stopping a worker."""
    worker_memory_limit_gb: float = 0.0
    """Host memory (resident set, GB = 1e9 bytes) a worker may use; 0: only the job's own
    ``resources.host_memory_gb`` (if any). With both, the smaller applies."""
    progress_interval_s: float = 1.0
    """Minimum seconds between two progress writes of one rank."""
    worker_command: list[str] = field(default_factory=list)
    """Worker command line; empty: ``python -m trainer.worker``."""
    store_port: int = 0
    """Rendezvous TCPStore port (0: ephemeral)."""
    etcd_ca: str = ""
    """CA of etcd's certificate (PEM), for https:// endpoints."""
    etcd_cert: str = ""
    """Client certificate for etcd (PEM), when etcd asks for one."""
    etcd_key: str = ""
    """Its private key (PEM)."""
    logs_auth: str = "token"
    """``token``: GET /logs needs an API token (role viewer or above) checked in etcd; ``off``: open
    (a cluster whose controller runs without authentication)."""
    data_roots: list[Path] = field(default_factory=list)
    """The only directories a job's ``data.path`` may name (agent/data_roots.py); empty: no token
    files at all (synthetic data only)."""
    checkpoint_dir: Path | None = None
    """Where jobs' disk checkpoints go (``<dir>/<job>``, ``TENAX_CHECKPOINT_DIR``): give every agent the
    same shared filesystem path, so a recovery on any node reads every rank's checkpoints; None:
    each job's run dir on this node (a recovery elsewhere cannot read them)."""
    fake_gpu_dir: Path | None = None
    """Test hook: read GPU telemetry from ``<dir>/<node id>.json`` (a JSON list of GpuSample fields)
    instead of NVML, so tests and game days can inject XID/ECC errors; None: NVML."""

    def etcd_tls(self):
        return EtcdTls(ca_file=self.etcd_ca, cert_file=self.etcd_cert, key_file=self.etcd_key) \
            if self.etcd_ca else None

    def validate(self) -> "AgentSettings":
        parse_endpoint(self.etcd)
        Keys(self.etcd_prefix)
        if self.etcd.strip().startswith("https://") and not self.etcd_ca:
            raise ValueError("--etcd is https: give --etcd-ca (and --etcd-cert/--etcd-key if etcd asks)")
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ValueError("--etcd-cert and --etcd-key go together")
        if not self.node_id or "/" in self.node_id or len(self.node_id) > 253:
            raise ValueError(f"--node-id must be a non-empty name without '/', got {self.node_id!r}")
        if self.gpus_per_slot < 1 or self.cpu_slots < 0:
            raise ValueError(f"--gpus-per-slot must be >= 1 and --cpu-slots >= 0, got {self.gpus_per_slot} "
                             f"and {self.cpu_slots}")
        if self.logs_auth not in ("token", "off"):
            raise ValueError(f"--logs-auth must be token or off, got {self.logs_auth!r}")
        if self.slots is not None and self.slots < 0:
            raise ValueError(f"--slots must be >= 0, got {self.slots}")
        if self.lease_ttl_s < 2:
            raise ValueError(f"--lease-ttl must be >= 2 seconds (etcd's minimum), got {self.lease_ttl_s}")
        if not 0 <= self.worker_memory_limit_gb < float("inf"):
            raise ValueError(f"--worker-memory-limit-gb must be >= 0 (0: none), got {self.worker_memory_limit_gb}")
        for name in ("telemetry_interval_s", "kill_grace_s", "progress_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("http_port", "store_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be a port (0-65535), got {getattr(self, name)}")
        for root in self.data_roots:
            if not Path(root).is_dir():
                raise ValueError(f"--data-root must be an existing directory, got {str(root)!r}")
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
            raise ValueError(f"--checkpoint-dir must be a directory, got {str(self.checkpoint_dir)!r}")
        if not self.advertise_host:
            wildcard = self.http_host in ("0.0.0.0", "::", "")
            self.advertise_host = socket.gethostname() if wildcard else self.http_host
        return self


class Agent:
    def __init__(self, settings: AgentSettings, *, gpu_source=None) -> None:
        self.settings = settings
        self.keys = Keys(settings.etcd_prefix)
        self.gpu_source = gpu_source if gpu_source is not None else \
            open_gpu_source(settings.node_id, settings.fake_gpu_dir)
        gpus = self.gpu_source.device_count()
        self.slot_devices = slot_devices(gpus=gpus, slots=settings.slots, gpus_per_slot=settings.gpus_per_slot,
                                         explicit=settings.slot_devices, cpu_slots=settings.cpu_slots)
        """Slot i -> the CUDA_VISIBLE_DEVICES of its workers (agent/slots.py)."""
        self.slots = len(self.slot_devices)
        self.started = time.time()
        self.condition = ("HEALTHY", "")
        self.address = ""
        self.store_address = ""
        self.stopping = asyncio.Event()
        self.etcd = None
        self.registration = None
        self.supervisor = None
        self._cancelled: set[str] = set()
        """Jobs cancelled or ended (terminal phase): their workers are stopped, never started."""
        self._tasks: list[asyncio.Task] = []
        self._xids_seen: dict[int, int] = {}
        """GPU index -> how many of its XID events were seen (the xid job events)."""

    # ------------------------------------------------------------ node info
    def node_info(self) -> dict[str, Any]:
        return NodeRecord(id=self.settings.node_id, slots=self.slots, hostname=socket.gethostname(),
                          address=self.address, store_address=self.store_address,
                          condition=self.condition[0], condition_reason=self.condition[1],
                          started=self.started, slot_devices=list(self.slot_devices)).to_dict()

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        s = self.settings
        metrics.AGENT_INFO.labels(s.node_id).set(1)
        metrics.AGENT_SLOTS.set(self.slots)
        s.work_dir.mkdir(parents=True, exist_ok=True)
        s.work_dir.chmod(0o700)  # job logs and launch files are not for other users of the host
        self.etcd = Etcd(s.etcd, tls=s.etcd_tls())
        # workers get no etcd endpoint or credentials: the supervisor relays plans to them
        self.supervisor = Supervisor(etcd=self.etcd, keys=self.keys, node_id=s.node_id, work_dir=s.work_dir,
                                     worker_command=s.worker_command or None,
                                     kill_grace_s=s.kill_grace_s, progress_interval_s=s.progress_interval_s,
                                     slot_devices=self.slot_devices, data_roots=s.data_roots,
                                     memory_limit_gb=s.worker_memory_limit_gb, checkpoint_dir=s.checkpoint_dir)
        self.registration = Registration(etcd=self.etcd, keys=self.keys, node_id=s.node_id, ttl_s=s.lease_ttl_s,
                                         node_info=self.node_info)
        http = AgentHttp(log_path=self.supervisor.log_path, healthy=lambda: self.registration.registered.is_set(),
                         log_index=self.supervisor.log_index, log_file=self.supervisor.log_file,
                         authorize=self._authorize_logs if s.logs_auth == "token" else None)
        store = RendezvousStore()
        try:
            port = await http.start(s.http_host, s.http_port)
            self.address = f"{s.advertise_host}:{port}"
            # the store (no authentication of its own) listens only where it is advertised
            bind = s.advertise_host if s.http_host in ("0.0.0.0", "::", "") else s.http_host
            store_port = await asyncio.to_thread(store.start, bind, s.store_port)
            self.store_address = f"{s.advertise_host}:{store_port}"
            await self._connect()
            self.registration.start()
            await self._registered()
            self._tasks = [asyncio.create_task(self._telemetry_loop(), name="telemetry"),
                           asyncio.create_task(self._jobs_loop(), name="jobs"),
                           asyncio.create_task(self._stop_when_registration_ends(), name="registration-end"),
                           asyncio.create_task(self.supervisor.watch_memory(), name="memory")]
            self._tasks += start_agent_tasks(self)
            log.info("agent %s ready: %d slots, http %s, store %s", s.node_id, self.slots, self.address,
                     self.store_address)
            await self.stopping.wait()
            if self.registration.refused is not None:
                raise self.registration.refused
        finally:
            await self._shutdown(http, store)

    async def _connect(self) -> None:
        """Connect, retrying while etcd is unreachable; a refusal (EtcdError) ends the agent."""
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                await self.etcd.connect()
                return
            except EtcdUnavailable as exc:
                log.warning("etcd %s not reachable (will retry): %r", self.settings.etcd, exc)
                await backoff.sleep()

    async def _registered(self) -> None:
        """Until the node is registered; raises the EtcdError that made the registration give up."""
        registered = asyncio.create_task(self.registration.registered.wait())
        ended = asyncio.create_task(self.registration.ended.wait())
        try:
            await asyncio.wait({registered, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
            ended.cancel()
        if self.registration.refused is not None:
            raise self.registration.refused

    async def _stop_when_registration_ends(self) -> None:
        """A node etcd refuses to register cannot run workers: stop the agent (run() raises why)."""
        await self.registration.ended.wait()
        self.stopping.set()

    async def _shutdown(self, http, store) -> None:
        log.info("agent %s stopping", self.settings.node_id)
        for t in self._tasks:
            t.cancel()
        try:
            if self.supervisor:
                await asyncio.wait_for(self.supervisor.stop_all("agent shutdown"),
                                       self.settings.kill_grace_s + 10)
        except Exception as exc:
            log.warning("stopping workers: %r", exc)
        finally:
            if self.supervisor:
                self.supervisor.kill_all_now()
        if self.registration:
            try:
                await asyncio.wait_for(self.registration.stop(revoke=True), 3.0)
            except Exception as exc:
                log.debug("revoke: %r", exc)
        await http.stop()
        store.stop()
        self.gpu_source.close()
        if self.etcd:
            await self.etcd.close()

    # ------------------------------------------------------------ telemetry
    async def _telemetry_loop(self) -> None:
        failures = FailureLog(log, "telemetry publishing")
        while True:
            try:
                host = sample_host()
                gpus = await asyncio.to_thread(self.gpu_source.sample)
                export_gauges(host, gpus)
                await self._xid_events(gpus)
                condition = node_condition(gpus)
                if condition != self.condition:
                    await self._publish_condition(condition)
                record = health_record(host, gpus, time.time())
                await self.registration.put_leased(self.keys.node_health(self.settings.node_id),
                                                   json.dumps(record))
                failures.ok()
            except EtcdUnavailable as exc:
                failures.failed(exc)
            except EtcdError as exc:  # permanent for this sample: skip it, the next one is new data
                log.error("telemetry sample not published (etcd refused it; skipped): %s", exc)
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry sample failed")
            await asyncio.sleep(self.settings.telemetry_interval_s)

    async def _authorize_logs(self, header: str | None) -> tuple[int, str]:
        """GET /logs: an API token of role viewer or above (agent/http.py)."""
        token = tokens.bearer(header)
        if token is None:
            return 401, "GET /logs needs 'Authorization: Bearer <API token>' (role viewer or above)"
        try:
            who = await tokens.verify(self.etcd, self.keys, token, least_role="viewer")
        except (EtcdError, EtcdUnavailable) as exc:
            return 503, f"cannot check the token now (etcd: {exc}); retry"
        if who is None:
            return 401, "unknown, revoked or malformed token"
        return 200, who[0]

    async def _xid_events(self, gpus) -> None:
        """An ``xid`` job event, for every job with a live worker here, per new XID on a GPU (the
        evidence the controller's drain decision follows from). Best effort."""
        new = new_xids(self._xids_seen, gpus)
        if not new:
            return
        jobs: dict[str, list[int]] = {}
        for w in self.supervisor.all_workers():
            if w.alive:
                jobs.setdefault(w.job, []).append(w.rank)
        condition, reason = node_condition(gpus)
        for job, ranks in sorted(jobs.items()):
            for gpu, xids in sorted(new.items()):
                event = events.new_event(
                    "xid", f"GPU {gpu} on {self.settings.node_id} reported XID {', '.join(map(str, xids))} "
                           f"(node {condition}{': ' + reason if reason else ''})",
                    action="node condition published; the controller drains a DEGRADED or FAILED node",
                    data={"node": self.settings.node_id, "gpu": gpu, "xids": xids, "ranks_here": sorted(ranks),
                          "condition": condition, "condition_reason": reason})
                try:
                    await events.emit(self.etcd, self.keys, job, event)
                except (EtcdError, EtcdUnavailable) as exc:
                    log.warning("xid event of job %s not written: %r", job, exc)

    async def _publish_condition(self, condition: tuple[str, str]) -> None:
        """Rewrite NodeInfo with a new condition. The condition counts as published only once
        written, so a failed write (etcd away) is retried at the next sample, not lost."""
        previous, self.condition = self.condition, condition  # node_info() reads self.condition
        try:
            await self.registration.update_info()
        except BaseException:
            self.condition = previous
            raise
        log.warning("node condition %s -> %s %s", previous[0], condition[0], condition[1])

    # ------------------------------------------------------------ jobs
    async def _jobs_loop(self) -> None:
        """Sync with etcd, then follow changes; after any break (etcd restart) sync again."""
        backoff = Backoff(0.1, 2.0)
        failures = FailureLog(log, "jobs watch")
        first = True
        while True:
            try:
                revision = await self._sync(first=first)
                first = False
                failures.ok()
                backoff.reset()
                async for ev in self.etcd.watch_prefix(self.keys.jobs(), start_revision=revision + 1):
                    await self._on_job_event(ev.kind, ev.key, ev.value)
                raise EtcdUnavailable("jobs watch ended")
            # The watch must survive both: a fresh sync also cures a refused watch (compacted revision).
            except (EtcdError, EtcdUnavailable) as exc:
                failures.failed(exc)
                await backoff.sleep()
            except Exception:  # a bug must not silently end the watch: log it, resync
                log.exception("jobs watch failed; resyncing")
                await backoff.sleep()

    async def _sync(self, *, first: bool) -> int:
        """Apply every plan naming this node; returns a revision to watch from.

        The revision comes from a write made before the reads, so watching from
        it replays at most a few events we already saw (plans are idempotent)
        and never misses one.
        """
        node = self.settings.node_id
        lease = self.registration.lease_id
        if lease is None:  # never write NodeInfo without a lease: it would outlive the agent
            raise EtcdUnavailable("not registered")
        revision = await self.etcd.put(self.keys.node(node), json.dumps(self.node_info()), lease=lease)
        job_ids = sorted({parsed[0] for key in await self.etcd.keys_prefix(self.keys.jobs())
                          if (parsed := self.keys.parse_job_key(key)) is not None})
        for job in job_ids:
            plan_kv = await self.etcd.get(self.keys.job_plan(job))
            if plan_kv is None:
                continue
            if await self.etcd.get(self.keys.job_cancel(job)) is not None:
                self._cancelled.add(job)
            status_kv = await self.etcd.get(self.keys.job_status(job))
            status = parse_or_none(JobStatusRecord, status_kv.value, log, status_kv.key) if status_kv else None
            terminal = status is not None and status.phase in TERMINAL_PHASES
            for kv in await self.etcd.get_prefix(self.keys.job_workers(job)):
                rec = parse_or_none(WorkerStatusRecord, kv.value, log, kv.key)
                if rec is None or rec.node != node:
                    continue
                await self._remember_reported(job, rec, first=first)
            if terminal:
                await self._job_ended(job, status.phase)
                continue
            await self._on_plan(job, plan_kv.value)
            growth_kv = await self.etcd.get(self.keys.job_growth(job))
            await self._on_growth(job, growth_kv.value if growth_kv is not None else None)
        return revision

    async def _remember_reported(self, job: str, rec, *, first: bool) -> None:
        """A worker status this node wrote earlier: never start that rank again for its generation.

        At the agent's first sync, a STARTING/RUNNING record is from a previous life of
        this agent; its workers died with it (parent-death signal): report them FAILED.
        """
        # a worker is its slot: the record may sit under the rank it had in an older generation
        if any(w.job == job and w.slot == rec.slot and w.alive for w in self.supervisor.all_workers()):
            return
        self.supervisor.remember(LocalWorker(job=job, rank=rec.rank, slot=rec.slot, generation=rec.generation,
                                             alive=False))
        if first and rec.state in ("STARTING", "RUNNING"):
            dead = WorkerStatusRecord(rank=rec.rank, node=rec.node, state="FAILED", slot=rec.slot, pid=rec.pid,
                                      exit_code=None, signal="SIGKILL", generation=rec.generation,
                                      time=time.time()).to_dict()
            dead["reason"] = "agent restarted; the worker died with the previous agent"
            await self.etcd.put(self.keys.job_worker(job, rec.rank), json.dumps(dead))

    async def _on_job_event(self, kind: str, key: str, value: str) -> None:
        parsed = self.keys.parse_job_key(key)
        if parsed is None:
            return
        job, rest = parsed
        if rest == "plan":
            if kind == "put":
                await self._on_plan(job, value)
            else:
                await self.supervisor.cancel_job(job)  # the job is gone
        elif rest == "growth":
            await self._on_growth(job, value if kind == "put" else None)
        elif rest == "cancel" and kind == "put":
            self._cancelled.add(job)
            await self.supervisor.cancel_job(job)
        elif rest == "status" and kind == "put":
            status = parse_or_none(JobStatusRecord, value, log, key)
            if status is not None and status.phase in TERMINAL_PHASES:
                await self._job_ended(job, status.phase)

    async def _job_ended(self, job: str, phase: str) -> None:
        """A job reached a terminal phase: stop what is left of it (e.g. ranks blocked in a
        collective after a peer failed) and forget it."""
        self._cancelled.add(job)
        await self.supervisor.cancel_job(job, reason=f"job {phase}")
        self.supervisor.forget_job(job)

    async def _on_plan(self, job: str, value: str) -> None:
        try:
            plan = Plan.from_json(value)
        except PlanError as exc:
            log.warning("skipping malformed plan of job %s: %s", job, exc)
            return
        if plan.job_id != job:
            log.warning("skipping plan at job %s that names job %s", job, plan.job_id)
            return
        node = self.settings.node_id
        has_local = any(w.job == job for w in self.supervisor.local_views())
        if not plan.workers_on(node) and not has_local:
            return
        self.supervisor.relay_plan(plan)  # first: running workers wait for it (recovery path)
        spec = await self._spec(job) if plan.workers_on(node) else None
        await self.supervisor.apply_plan(plan, cancelled=job in self._cancelled, spec=spec)

    async def _on_growth(self, job: str, value: str | None) -> None:
        """A growth record changed (or is gone): start or stop this node's new workers for it."""
        growth = parse_or_none(GrowthRecord, value, log, self.keys.job_growth(job)) if value else None
        node = self.settings.node_id
        mine = growth is not None and any(n == node for n, _ in growth.joiner_slots())
        preparing = any(w.job == job and w.preparing for w in self.supervisor.local_views())
        if not mine and not preparing:
            return
        generation = None
        spec = None
        if mine and growth.state == "PREPARING":
            plan_kv = await self.etcd.get(self.keys.job_plan(job))
            try:  # a growth on a plan that changed meanwhile is stale: start nothing for it
                generation = Plan.from_json(plan_kv.value).generation if plan_kv is not None else None
            except PlanError:
                generation = None
            spec = await self._spec(job)
        await self.supervisor.apply_growth(job, growth, plan_generation=generation, spec=spec,
                                           cancelled=job in self._cancelled)

    async def _spec(self, job: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(self.keys.job_spec(job))
        if kv is None:
            return None
        try:
            spec = json.loads(kv.value)
        except ValueError:
            log.warning("job %s: malformed spec in etcd", job)
            return None
        return spec if isinstance(spec, dict) else None
