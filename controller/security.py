"""One place that puts the security pieces on a gRPC server or client.

Server side (the controller)::

    security = ServerSecurity(etcd, keys, settings)          # SecuritySettings
    server = grpc.aio.server(interceptors=security.interceptors(), options=security.server_options())
    ... add the Job/Node services ...
    security.add_services(server)                            # AuditService
    port = security.add_port(server, "127.0.0.1:0")          # TLS / mTLS / (explicit) plaintext

Handlers call ``controller.auth.owner_name()`` to record who submitted a job
(under ``Keys.job_owner``), which is what lets a submitter cancel its own jobs.

Client side (the CLI): ``add_client_args(parser)`` adds ``--ca-file``,
``--cert-file``, ``--key-file``, ``--plaintext``, ``--server-name`` and
``--token-file`` (the token itself never goes on the command line; it comes
from that file or ``$TENAX_TOKEN``), and ``client_channel(args, target)``
opens a blocking channel that carries the token on every call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from controller import auth, limits
from controller.audit import AuditLog, AuditSettings, add_audit_service
from common.etcd import Etcd, EtcdTls
from controller.tls import TlsSettings, add_port, ensure_dev_pki, sync_channel
from protos.keys import Keys
from protos.records import TERMINAL_PHASES, JobStatusRecord, RecordError

ENV_CA = "TENAX_CA_FILE"
ENV_CERT = "TENAX_CERT_FILE"
ENV_KEY = "TENAX_KEY_FILE"
ENV_TOKEN_FILE = "TENAX_TOKEN_FILE"
ENV_PLAINTEXT = "TENAX_PLAINTEXT"


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
def add_client_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--ca-file", default=os.environ.get(ENV_CA, ""),
                       help=f"CA that signed the controller's certificate (default ${ENV_CA})")
    group.add_argument("--cert-file", default=os.environ.get(ENV_CERT, ""),
                       help=f"client certificate for mutual TLS (default ${ENV_CERT})")
    group.add_argument("--key-file", default=os.environ.get(ENV_KEY, ""),
                       help=f"its private key (default ${ENV_KEY})")
    group.add_argument("--server-name", default="", help="name expected in the controller's certificate")
    group.add_argument("--plaintext", action="store_true", default=os.environ.get(ENV_PLAINTEXT) == "1",
                       help=f"no TLS (development only; logs a warning; or ${ENV_PLAINTEXT}=1)")
    group.add_argument("--token-file", default=os.environ.get(ENV_TOKEN_FILE, ""),
                       help=f"file holding the API token (default ${ENV_TOKEN_FILE}, else ${auth.TOKEN_ENV})")


def client_tls_from_args(args: argparse.Namespace, local: dict | None = None) -> TlsSettings:
    """Flags and environment first; else the local cluster's CA (``local``: its ``security`` record)."""
    if getattr(args, "plaintext", False):
        return TlsSettings(mode="plaintext")
    ca_file = getattr(args, "ca_file", "") or (local or {}).get("ca_file", "")
    if not ca_file:
        raise ValueError("no CA to verify the controller with: pass --ca-file or set TENAX_CA_FILE "
                         "(or --plaintext for a controller started without TLS)")
    cert_file = getattr(args, "cert_file", "")
    return TlsSettings(mode="mtls" if cert_file else "tls", ca_file=ca_file, cert_file=cert_file,
                       key_file=getattr(args, "key_file", ""),
                       server_name=getattr(args, "server_name", "")).validate(server=False)


def client_token(args: argparse.Namespace, local: dict | None = None) -> str | None:
    """``--token-file``, else ``$TENAX_TOKEN``, else the local cluster's admin token file."""
    token = auth.read_token(getattr(args, "token_file", "") or None)
    if token is None and (local or {}).get("token_file"):
        token = auth.read_token(local["token_file"])
    return token


def client_channel(args: argparse.Namespace, target: str, *, local: dict | None = None,
                   options: list | None = None) -> grpc.Channel:
    """A blocking channel to ``target`` with TLS and the caller's token on every call.

    ``local`` is the ``security`` record of the local cluster (``tenax up``), used
    for whatever the flags and environment leave open.
    """
    channel = sync_channel(target, client_tls_from_args(args, local), options)
    token = client_token(args, local)
    return grpc.intercept_channel(channel, auth.TokenClientInterceptor(token)) if token else channel


def local_security_for(target: str, state: dict | None) -> dict | None:
    """The local cluster's ``security`` record, only if ``target`` is one of its controllers. Pure.

    Never hand the local admin token to some other server the user pointed us at.
    """
    if not state or not isinstance(state.get("security"), dict):
        return None
    controllers = state.get("controllers") or [state.get("controller")]
    return state["security"] if target in controllers else None


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
            existing = auth.read_token(str(token_file)) if token_file.is_file() else None
            if existing and await store.authenticate(existing):
                return
            token, _ = await store.create(LOCAL_ADMIN, "admin")
            write_secret(token_file, token)

    asyncio.run(asyncio.wait_for(ensure_token(), timeout_s))
    return {"ca_file": pki.ca_file, "server_cert": pki.server.cert_file, "server_key": pki.server.key_file,
            "token_file": str(token_file)}


def local_channel(address: str, record: dict) -> grpc.Channel:
    """A blocking channel to a local cluster's controller with its CA and admin token (tests, `tenax demo`)."""
    return client_channel(argparse.Namespace(), address, local=record)


def client_env(record: dict) -> dict[str, str]:
    """Environment that points child `tenax` commands at a local cluster's CA and admin token."""
    return {ENV_CA: record["ca_file"], ENV_TOKEN_FILE: record["token_file"]}


def controller_tls_args(record: dict) -> list[str]:
    """``tenax controller`` flags that serve TLS with the local cluster's certificate."""
    return ["--tls", "tls", "--tls-cert", record["server_cert"], "--tls-key", record["server_key"]]


def write_secret(path: str | Path, text: str) -> None:
    """Write a token file readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
