"""One place that puts the security pieces on a gRPC server or client.

Server side (the controller)::

    security = ServerSecurity(etcd, keys, settings)          # SecuritySettings
    server = grpc.aio.server(interceptors=security.interceptors(), options=security.server_options())
    ... add the Job/Node services ...
    security.add_services(server)                            # AuditService
    port = security.add_port(server, "127.0.0.1:0")          # TLS / mTLS / (explicit) plaintext

Handlers call ``controller.auth.owner_name()`` to record who submitted a job
(under ``Keys.job_owner``), which is what lets a submitter cancel its own jobs.

The client side (flags, token, channels that carry it) is cli/credentials.py.
For ``tenax up``: ``bootstrap_local`` makes a development PKI and an admin token.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from controller import auth, limits
from controller.audit import AuditLog, AuditSettings, add_audit_service
from common.etcd import Etcd, EtcdTls
from controller.tls import TlsSettings, add_port, ensure_dev_pki
from protos.keys import Keys
from protos.records import TERMINAL_PHASES, JobStatusRecord, RecordError

@dataclass(kw_only=True)
class SecuritySettings:
    """Everything the API server needs to know to protect itself."""

    tls: TlsSettings = field(default_factory=TlsSettings)
    """Transport security of the gRPC port."""
    auth: auth.AuthSettings = field(default_factory=auth.AuthSettings)
    """Who may call (tokens, client certificates) or, explicitly, everyone."""
    limits: limits.Limits = field(default_factory=limits.Limits)
    """Request size, string lengths, jobs per user, call rate."""
    audit: AuditSettings = field(default_factory=AuditSettings)
    """Retention of the audit log."""
    token_cache_s: float = 2.0
    """How long the server trusts its copy of the token list (seconds); revocation takes at most this long."""

    def validate(self) -> "SecuritySettings":
        self.tls.validate(server=True)
        self.auth.validate()
        self.limits.validate()
        self.audit.validate()
        if not self.token_cache_s >= 0:
            raise ValueError(f"token_cache_s: must be >= 0, got {self.token_cache_s}")
        return self

    @classmethod
    def insecure_for_tests(cls) -> "SecuritySettings":
        """Plaintext, no authentication: the explicit opt-out (both log a warning)."""
        return cls(tls=TlsSettings(mode="plaintext"), auth=auth.AuthSettings(enabled=False))


# ------------------------------------------------------------------ lookups
def owner_lookup(etcd: Etcd, keys: Keys) -> auth.OwnerLookup:
    """(method, request) -> owner of the job in ``request.job_id``; None if none recorded."""
    async def owner_of(method: str, request) -> str | None:
        job_id = getattr(request, "job_id", "")
        if not isinstance(job_id, str) or not job_id or "/" in job_id:
            return None
        kv = await etcd.get(keys.job_owner(job_id))
        return kv.value if kv else None
    return owner_of


def active_jobs_lookup(etcd: Etcd, keys: Keys) -> auth.ActiveJobsLookup:
    """identity name -> number of its jobs not yet SUCCEEDED/FAILED/CANCELLED (one range read + one per owned job)."""
    async def active_jobs_of(name: str) -> int:
        head = keys.owners()
        owned = [kv.key[len(head):] for kv in await etcd.get_prefix(head) if kv.value == name]
        active = 0
        for job_id in owned:
            kv = await etcd.get(keys.job_status(job_id))
            active += int(job_is_active(kv.value if kv else None))
        return active
    return active_jobs_of


def job_is_active(status_json: str | None) -> bool:
    """A job counts against its owner until its status says it ended. Pure.

    A missing or malformed status counts as active: an unreadable record must not
    let a user slip past the limit.
    """
    if status_json is None:
        return True
    try:
        return JobStatusRecord.from_json(status_json).phase not in TERMINAL_PHASES
    except (RecordError, ValueError):
        return True


# ------------------------------------------------------------------ server
class ServerSecurity:
    """The interceptor, options, extra services and port binding for one API server."""

    def __init__(self, etcd: Etcd, keys: Keys, settings: SecuritySettings) -> None:
        self.settings = settings.validate()
        self.etcd = etcd
        self.keys = keys
        self.audit = AuditLog(etcd, keys, settings.audit)
        self.tokens = auth.TokenStore(etcd, keys, cache_ttl_s=settings.token_cache_s)
        self.rate = limits.RateLimiter(settings.limits)
        self.interceptor = auth.SecurityInterceptor(
            settings=settings.auth, tokens=self.tokens, limits=settings.limits, rate=self.rate, audit=self.audit,
            owner_of=owner_lookup(etcd, keys), active_jobs_of=active_jobs_lookup(etcd, keys))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [self.interceptor]

    def server_options(self) -> list[tuple[str, int]]:
        return limits.server_options(self.settings.limits)

    def add_services(self, server: grpc.aio.Server) -> None:
        add_audit_service(server, self.audit)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        return add_port(server, address, self.settings.tls)


# ------------------------------------------------------------------ command line
# ------------------------------------------------------------------ local cluster
LOCAL_ADMIN = "local-admin"
LOCAL_TOKEN_FILE = "admin.token"


def bootstrap_local(state_dir: str | Path, etcd_url: str, *, prefix: str = "/tenax",
                    etcd_tls: EtcdTls | None = None, timeout_s: float = 20.0) -> dict:
    """For ``tenax up``: a dev PKI and an admin token file under ``state_dir``.

    Returns the ``security`` record to keep in the cluster state:
    ``{ca_file, server_cert, server_key, token_file}``. An existing token file is
    kept if etcd still knows the token (a restarted cluster on the same data);
    otherwise a new admin token is made. Raises EtcdError / ValueError.
    """
    state_dir = Path(state_dir)
    pki = ensure_dev_pki(state_dir)
    token_file = state_dir / LOCAL_TOKEN_FILE

    async def ensure_token() -> None:
        async with Etcd(etcd_url, tls=etcd_tls) as etcd:
            store = auth.TokenStore(etcd, Keys(prefix), cache_ttl_s=0)
            existing = auth.read_token_file(str(token_file)) if token_file.is_file() else None
            if existing and await store.authenticate(existing):
                return
            token, _ = await store.create(LOCAL_ADMIN, "admin", operator=auth.operator_identity())
            write_secret(token_file, token)

    asyncio.run(asyncio.wait_for(ensure_token(), timeout_s))
    return {"ca_file": pki.ca_file, "server_cert": pki.server.cert_file, "server_key": pki.server.key_file,
            "token_file": str(token_file)}


def write_secret(path: str | Path, text: str) -> None:
    """Write a token file readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
