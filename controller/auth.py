"""Who is calling, and may they: authentication, roles, and the server interceptor.

Identities come from either

* a bearer token (``authorization: Bearer tnx.<id>.<secret>`` metadata), made
  by ``tenax tokens create``, shown once, and stored in etcd only as a salted
  SHA-256 hash with its name and role; or
* a client certificate verified by the TLS handshake (mutual TLS): the subject
  CN is the name, the subject O is the role.

A token wins when both are present (the explicit credential of this call).

Why salted SHA-256 and not PBKDF2/scrypt: a token's secret is 256 random bits
from ``secrets``, not a human password. Slow hashes exist to make guessing
low-entropy passwords expensive; against 2^256 candidates guessing is already
hopeless, so a slow hash would only add ~100 ms of CPU to every call (and hand
an attacker a cheap way to burn the controller's CPU with bogus tokens). The
salt keeps equal secrets from having equal hashes in an etcd dump, and
``hmac.compare_digest`` keeps the comparison constant-time.

Roles, least to most: viewer (read), submitter (submit; cancel own jobs),
admin (nodes, chaos, audit, any job). ``authorize`` is a pure function over the
table ``METHOD_RULES``; a method missing from the table needs admin (fail
closed for new RPCs nobody classified yet).

``SecurityInterceptor`` (grpc.aio) runs before every handler: authenticate
(UNAUTHENTICATED), rate-limit (RESOURCE_EXHAUSTED), check string sizes
(INVALID_ARGUMENT), authorize (PERMISSION_DENIED, with the job owner looked up
for owner-scoped methods), jobs-per-user (RESOURCE_EXHAUSTED), then runs the
handler with ``current_identity()`` set, and finally audits mutating calls
with their result code.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import getpass
import hmac
import inspect
import json
import logging
import math
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, NamedTuple

import grpc

from controller import limits as limits_mod
from controller.audit import MAX_DETAIL_CHARS, MAX_TARGET_CHARS, AuditLog, AuditRecord, clean_text
from common import tokens
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from controller.tls import peer_certificate
from protos.keys import Keys

log = logging.getLogger(__name__)

ROLES = tokens.ROLES
_RANK = {role: rank for rank, role in enumerate(ROLES)}

TOKEN_PREFIX = tokens.TOKEN_PREFIX  # the format and the hash: common/tokens.py (the agent checks tokens too)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,62}$")
HASH_ALGORITHM = tokens.HASH_ALGORITHM


class AuthError(ValueError):
    """Bad input to an auth operation (unknown role, bad name): permanent."""


# ------------------------------------------------------------------ identity
@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    via: str
    """``token``, ``certificate``, or ``open`` (authentication switched off explicitly)."""


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("tenax_identity", default=None)


def current_identity() -> Identity | None:
    """The caller of the RPC being handled (set by SecurityInterceptor); None outside a guarded call."""
    return _current.get()


_job_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("tenax_job_limit", default=None)


def active_jobs_limit() -> int | None:
    """The caller's active-jobs limit while a SubmitJob is handled (the handler enforces it
    atomically: controller/api.py); None when no limit applies."""
    return _job_limit.get()


def owner_name() -> str:
    """The name to record as a new job's owner ('' when the server runs without authentication)."""
    identity = _current.get()
    return identity.name if identity else ""


# ------------------------------------------------------------ authorization
@dataclass(frozen=True)
class MethodRule:
    role: str
    """Least role that may call the method."""
    mutating: bool
    """Changes state: audited."""
    owner_scoped: bool = False
    """Non-admins may act only on resources they own (the job's submitter)."""


PUBLIC = "public"
JOB = "/tenax.v1.JobService/"
NODE = "/tenax.v1.NodeService/"
METHOD_RULES: dict[str, MethodRule] = {
    JOB + "SubmitJob": MethodRule(role="submitter", mutating=True),
    JOB + "CancelJob": MethodRule(role="submitter", mutating=True, owner_scoped=True),
    JOB + "GetJob": MethodRule(role="viewer", mutating=False),
    JOB + "ListJobs": MethodRule(role="viewer", mutating=False),
    JOB + "WatchJob": MethodRule(role="viewer", mutating=False),
    JOB + "GetJobMetrics": MethodRule(role="viewer", mutating=False),
    JOB + "ListJobEvents": MethodRule(role="viewer", mutating=False),
    NODE + "ListNodes": MethodRule(role="viewer", mutating=False),
    NODE + "CordonNode": MethodRule(role="admin", mutating=True),
    NODE + "UncordonNode": MethodRule(role="admin", mutating=True),
    NODE + "DrainNode": MethodRule(role="admin", mutating=True),
    "/tenax.v1.AuditService/ListAudit": MethodRule(role="admin", mutating=False),
    "/tenax.v1.ChaosService/Inject": MethodRule(role="admin", mutating=True),
    # Load balancers and kubelets probe health without credentials.
    "/grpc.health.v1.Health/Check": MethodRule(role=PUBLIC, mutating=False),
    "/grpc.health.v1.Health/Watch": MethodRule(role=PUBLIC, mutating=False),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": MethodRule(role="viewer", mutating=False),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": MethodRule(role="viewer", mutating=False),
}
# Unclassified methods (a new chaos RPC, say): admin only, and audited as if they mutate.
UNKNOWN_METHOD_RULE = MethodRule(role="admin", mutating=True)


def rule_for(method: str) -> MethodRule:
    return METHOD_RULES.get(method, UNKNOWN_METHOD_RULE)


class Decision(NamedTuple):
    allowed: bool
    reason: str


def authorize(identity: Identity | None, method: str, resource_owner: str | None = None) -> Decision:
    """May ``identity`` call ``method`` on a resource owned by ``resource_owner``? Pure.

    ``resource_owner`` matters only for owner-scoped methods (None: no owner recorded).
    """
    rule = rule_for(method)
    short = method.rsplit("/", 1)[-1]
    if rule.role == PUBLIC:
        return Decision(True, "public method")
    if identity is None:
        return Decision(False, "no credentials")
    if identity.role not in _RANK:
        return Decision(False, f"unknown role {identity.role!r}")
    if _RANK[identity.role] < _RANK[rule.role]:
        return Decision(False, f"{short} needs role {rule.role}; {identity.name!r} is {identity.role}")
    if rule.owner_scoped and identity.role != "admin":
        if not resource_owner:
            return Decision(False, f"{short}: the job has no recorded owner; only an admin may do this")
        if resource_owner != identity.name:
            return Decision(False, f"{short}: the job belongs to another user; "
                                   f"a {identity.role} may act on own jobs only")
    return Decision(True, f"role {identity.role} may call {short}")


# ------------------------------------------------------------------ tokens
@dataclass(frozen=True, kw_only=True)
class TokenRecord:
    """What etcd keeps about a token: never the token itself."""

    token_id: str
    name: str
    role: str
    salt: str
    """16 random bytes, hex."""
    digest: str
    """sha256(salt || secret), hex."""
    created: float
    """Unix seconds."""
    algorithm: str = HASH_ALGORITHM
    expires: float = 0.0
    """Unix seconds after which the token is refused (and deleted); 0: never."""

    def expired(self, now: float) -> bool:
        return bool(self.expires) and now >= self.expires

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TokenRecord":
        try:
            data = json.loads(text)
            record = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"malformed token record: {exc}") from exc
        if record.algorithm != HASH_ALGORITHM or record.role not in ROLES or not all(
                isinstance(v, str) for v in (record.token_id, record.name, record.salt, record.digest)) or \
                not isinstance(record.expires, (int, float)) or isinstance(record.expires, bool):
            raise ValueError("token record has an unknown algorithm, role or field type")
        return record

    def identity(self) -> Identity:
        return Identity(name=self.name, role=self.role, via="token")


_digest = tokens.digest


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AuthError(f"name: must be 1-63 of a-z 0-9 . _ @ - (starting with a letter or digit), got {name!r}")
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"role: must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def new_token(name: str, role: str, *, now: float | None = None) -> tuple[str, TokenRecord]:
    """A fresh token (to show once) and the record to store."""
    validate_name(name)
    validate_role(role)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = TokenRecord(token_id=token_id, name=name, role=role, salt=salt, digest=_digest(salt, secret),
                         created=time.time() if now is None else now)
    return f"{TOKEN_PREFIX}.{token_id}.{secret}", record


parse_token = tokens.parse_token


def bearer_token(metadata) -> str | None:
    """The bearer token in call metadata, if any (the last ``authorization`` header wins nothing: one only)."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if len(values) != 1:
        return None
    value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


TOKEN_AUDIT_METHOD = "tokens/"
"""Audit method of token management: ``tokens/create``, ``tokens/revoke``, ``tokens/expire``."""
SYSTEM_IDENTITY = Identity(name="tenax-controller", role="system", via="system")
"""Who expires tokens (any controller replica; the guarded delete lets exactly one record it)."""


def operator_identity() -> Identity:
    """Who runs ``tenax tokens`` on this machine: the OS user at the host. Token management needs
    etcd credentials, not an API token, so that is the identity the audit can name."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return Identity(name=clean_text(f"{user}@{socket.gethostname()}", MAX_TARGET_CHARS), role="operator", via="etcd")


class TokenStore:
    """Token records in etcd, cached in memory.

    The whole set is re-read at most every ``cache_ttl_s`` seconds (one range
    read), so checking a token costs no etcd round trip and a bogus token costs
    nothing at all; a revoked token stops working within ``cache_ttl_s``. An
    expired token stops working at once; the next refresh deletes it and audits that.

    Every change is audited in the transaction that makes it (create, expire) or just
    before it (revoke), under the audit log's keys, naming who did it.
    """

    def __init__(self, etcd: Etcd, keys: Keys, *, cache_ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if not cache_ttl_s >= 0:
            raise ValueError(f"cache_ttl_s: must be >= 0, got {cache_ttl_s}")
        self.etcd = etcd
        self.keys = keys
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self.wall_clock = wall_clock
        self._records: dict[str, TokenRecord] = {}
        self._loaded_at: float | None = None

    def _audit_entry(self, operator: Identity, verb: str, record: TokenRecord, detail: str = "") -> tuple[str, str]:
        now = self.wall_clock()
        entry = AuditRecord(time=now, identity=operator.name, role=operator.role, via=operator.via,
                            method=TOKEN_AUDIT_METHOD + verb,
                            target=clean_text(f"{record.name} ({record.role}) {record.token_id}", MAX_TARGET_CHARS),
                            code="OK", detail=clean_text(detail, MAX_DETAIL_CHARS))
        return self.keys.audit_record(int(now * 1e9), secrets.token_hex(4)), entry.to_json()

    async def create(self, name: str, role: str, *, operator: Identity, expires_in_s: float = 0.0
                     ) -> tuple[str, TokenRecord]:
        """A new token, stored with its audit record in one transaction. ``expires_in_s`` 0: never."""
        if not (expires_in_s >= 0 and math.isfinite(expires_in_s)):
            raise AuthError(f"expires_in_s: must be >= 0 seconds, got {expires_in_s}")
        token, record = new_token(name, role, now=self.wall_clock())
        if expires_in_s:
            record = dataclasses.replace(record, expires=record.created + expires_in_s)
        key = self.keys.token(record.token_id)
        audit_key, audit_value = self._audit_entry(
            operator, "create", record, f"expires {_when(record.expires)}" if record.expires else "never expires")
        if not await self.etcd.put_many_guarded({key: 0}, {key: record.to_json(), audit_key: audit_value}):
            raise EtcdError("token id collision; try again")  # 64 random bits: practically never
        self._loaded_at = None
        return token, record

    async def list(self) -> list[TokenRecord]:
        await self._refresh(force=True)
        return sorted(self._records.values(), key=lambda r: (r.name, r.created))

    async def revoke(self, token_id_or_name: str, *, operator: Identity) -> int:
        """Delete the token with that id, or every token with that name; return how many. Audited."""
        gone = 0
        for record in await self.list():
            if token_id_or_name in (record.token_id, record.name):
                key = self.keys.token(record.token_id)
                kv = await self.etcd.get(key)
                if kv is None:
                    continue
                audit_key, audit_value = self._audit_entry(operator, "revoke", record)
                gone += int(await self.etcd.put_many_guarded({key: kv.mod_revision}, {audit_key: audit_value},
                                                             deletes=(key,)))
        self._loaded_at = None
        return gone

    async def authenticate(self, token: str) -> Identity | None:
        """The identity of a valid token; None if unknown, wrong or expired. Raises EtcdError if the
        store cannot be read."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        await self._refresh()
        record = self._records.get(parsed[0])
        if record is None or record.expired(self.wall_clock()):
            return None
        return record.identity() if record.matches(parsed[1]) else None

    async def _refresh(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and self._loaded_at is not None and now - self._loaded_at < self.cache_ttl_s:
            return
        records = {}
        expired = []
        for kv in await self.etcd.get_prefix(self.keys.tokens()):
            try:
                record = TokenRecord.from_json(kv.value)
            except ValueError as exc:
                log.warning("skipping malformed token record %s: %s", kv.key, exc)
                continue
            if record.expired(self.wall_clock()):
                expired.append((kv, record))
                continue
            records[record.token_id] = record
        self._records = records
        self._loaded_at = now
        for kv, record in expired:
            audit_key, audit_value = self._audit_entry(SYSTEM_IDENTITY, "expire", record,
                                                       f"expired {_when(record.expires)}")
            if await self.etcd.put_many_guarded({kv.key: kv.mod_revision}, {audit_key: audit_value},
                                                deletes=(kv.key,)):
                log.info("token %s of %s (%s) expired and was deleted", record.token_id, record.name, record.role)


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def identity_from_certificate(auth_context: dict) -> tuple[Identity | None, str]:
    """(identity, why not) from a verified client certificate in the gRPC auth context."""
    cert = peer_certificate(auth_context)
    if cert is None:
        return None, "no client certificate"
    if not cert.common_name or cert.organization not in ROLES:
        return None, f"client certificate {cert.common_name!r} carries no Tenax role (subject O=)"
    return Identity(name=cert.common_name, role=cert.organization, via="certificate"), ""


# -------------------------------------------------------------- interceptor
@dataclass(kw_only=True)
class AuthSettings:
    """How the API server authenticates callers."""

    enabled: bool = True
    """False lets every caller in as an admin named 'anonymous': only when asked for explicitly (warned)."""
    accept_tokens: bool = True
    """Bearer tokens from the token store."""
    accept_certificates: bool = True
    """Verified client certificates (needs mutual TLS to ever see one)."""

    def validate(self) -> "AuthSettings":
        if self.enabled and not (self.accept_tokens or self.accept_certificates):
            raise ValueError("auth: accept tokens, certificates or both (or disable auth explicitly)")
        return self


CREDENTIALS_UNCHECKABLE = "credentials cannot be checked right now (etcd unavailable); retry"
"""Why a call is refused while the token store cannot be read: answered UNAVAILABLE."""

OPEN_IDENTITY = Identity(name="anonymous", role="admin", via="open")

OwnerLookup = Callable[[str, Any], Awaitable[str | None]]
"""(method, request) -> the owner of the resource the request names; None if none recorded."""
ActiveJobsLookup = Callable[[str], Awaitable[int]]
"""identity name -> how many of its jobs are still active."""


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the guard can answer INVALID_ARGUMENT.

    Left to itself, grpc.aio answers such a call UNKNOWN and logs a traceback as if the
    service had crashed.
    """

    problem: str


def _tolerant(deserialize):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError and friends: the bytes are not a valid message
            return MalformedRequest(problem=clean_text(exc, MAX_DETAIL_CHARS))
    return parse


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def target_of(request: Any) -> str:
    """What a request is about, for the audit log: a job id, node id or spec name. Pure."""
    for name in ("job_id", "node_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return clean_text(value, MAX_TARGET_CHARS)
    spec = getattr(request, "spec", None)
    if spec is not None and getattr(spec, "name", ""):
        return clean_text(spec.name, MAX_TARGET_CHARS)
    return ""


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555" / "unix:..." -> the address without the port
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else rest
    return f"{kind}:{host}"


def _code_name(code: Any) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpc versions hand back the integer
        if status.value[0] == code:
            return status.name
    return str(code)


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate, limit, authorize and audit every call (see module docstring)."""

    def __init__(self, *, settings: AuthSettings | None = None, tokens: TokenStore | None = None,
                 limits: limits_mod.Limits | None = None, rate: limits_mod.RateLimiter | None = None,
                 audit: AuditLog | None = None, owner_of: OwnerLookup | None = None,
                 active_jobs_of: ActiveJobsLookup | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = (settings or AuthSettings()).validate()
        if self.settings.enabled and self.settings.accept_tokens and tokens is None:
            raise ValueError("auth: accept_tokens needs a TokenStore")
        if not self.settings.enabled:
            log.warning("API authentication is OFF (asked for explicitly): every caller is an admin")
        self.tokens = tokens
        self.limits = (limits or limits_mod.Limits()).validate()
        self.rate = rate or limits_mod.RateLimiter(self.limits)
        self.audit = audit
        self.owner_of = owner_of
        self.active_jobs_of = active_jobs_of
        self.clock = clock

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, streaming_request=True),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, streaming_request=True),
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def _wrap_unary(self, method: str, behavior, *, streaming_request: bool = False):
        async def guarded(request, context):
            async def call():
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            return await self._guard(method, None if streaming_request else request, context, call)
        return guarded

    def _wrap_stream(self, method: str, behavior, *, streaming_request: bool = False):
        async def guarded(request, context):
            async def call():
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        await context.write(item)
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for item in result:
                        await context.write(item)
            await self._guard(method, None if streaming_request else request, context, call)
        return guarded

    async def _guard(self, method: str, request, context, call):
        rule = rule_for(method)
        if rule.role == PUBLIC:
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.problem}")
            return await call()
        identity, why = await self._authenticate(context)
        rate_key = f"id:{identity.name}" if identity else f"peer:{_peer_host(context.peer() or '')}"
        allowed, wait_s = self.rate.allow(rate_key)
        if not allowed:  # not audited: auditing a flood would write the flood into etcd
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many calls; retry in {wait_s:.2f} s")
        code, detail, created = "OK", "", ""
        try:
            await self._admit(method, rule, identity, why, request)
            token = _current.set(identity)
            limit_token = _job_limit.set(self.limits.max_active_jobs_per_user
                                         if self.active_jobs_of is not None else None)
            try:
                result = await call()
            finally:
                _job_limit.reset(limit_token)
                _current.reset(token)
            if method == JOB + "SubmitJob" and getattr(result, "id", ""):
                created = result.id  # the audit names the job the call created, not just its spec
            code, detail = _code_name(context.code()), clean_text(context.details() or "", MAX_DETAIL_CHARS)
            return result
        except _Refused as refused:
            code, detail = refused.code.name, refused.detail
            await context.abort(refused.code, refused.detail)
        except BaseException:
            # The handler aborted (code set on the context) or crashed (gRPC answers UNKNOWN).
            code = _code_name(context.code())
            code = "UNKNOWN" if code == "OK" else code
            detail = clean_text(context.details() or "", MAX_DETAIL_CHARS)
            raise
        finally:
            if rule.mutating and self.audit is not None:
                if identity is None:  # no valid credentials: counted per source, never one record each
                    await self.audit.refused(source=clean_text(_peer_host(context.peer() or ""), MAX_TARGET_CHARS),
                                             method=clean_text(method, MAX_TARGET_CHARS), code=code)
                else:
                    await self._audit(method, identity, request, context, code, detail, created)

    async def _authenticate(self, context) -> tuple[Identity | None, str]:
        if not self.settings.enabled:
            return OPEN_IDENTITY, ""
        token = bearer_token(context.invocation_metadata())
        if token is not None and self.settings.accept_tokens:
            try:
                identity = await self.tokens.authenticate(token)
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("token store unreadable: %s", exc)
                return None, CREDENTIALS_UNCHECKABLE
            return (identity, "") if identity else (None, "invalid or revoked token")
        if self.settings.accept_certificates:
            identity, why = identity_from_certificate(context.auth_context() or {})
            if identity:
                return identity, ""
            if token is None and why != "no client certificate":
                return None, why
        return None, "no credentials: send a bearer token (--token-file or TENAX_TOKEN) or a client certificate"

    async def _admit(self, method: str, rule: MethodRule, identity: Identity | None, why: str, request) -> None:
        """Raise _Refused unless the call may go ahead."""
        if identity is None and why == CREDENTIALS_UNCHECKABLE:
            # UNAVAILABLE, not UNAUTHENTICATED: the credentials may well be good, and clients
            # retry and fail over on UNAVAILABLE but give up on UNAUTHENTICATED.
            raise _Refused(grpc.StatusCode.UNAVAILABLE, why)
        if identity is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, why)
        if isinstance(request, MalformedRequest):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.problem}")
        if request is not None:
            field = limits_mod.oversized_string(request, self.limits.max_string_chars)
            if field:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{field}: longer than {self.limits.max_string_chars} characters")
        owner = None
        if rule.owner_scoped and identity.role != "admin" and self.owner_of is not None:
            owner = await self._lookup(self.owner_of(method, request))
        decision = authorize(identity, method, owner)
        if not decision.allowed:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        if method == JOB + "SubmitJob" and self.active_jobs_of is not None:
            active = await self._lookup(self.active_jobs_of(identity.name))
            problem = limits_mod.jobs_per_user_problem(active, self.limits.max_active_jobs_per_user)
            if problem:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)

    @staticmethod
    async def _lookup(awaitable):
        try:
            return await awaitable
        except (EtcdError, EtcdUnavailable) as exc:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"cannot check permissions right now, retry: {exc}")

    async def _audit(self, method: str, identity: Identity | None, request, context, code: str,
                     detail: str, created: str = "") -> None:
        target = target_of(request) if request is not None else ""
        if created:  # SubmitJob: the id of the job it made (which starts with the spec's name)
            target = clean_text(created, MAX_TARGET_CHARS)
        await self.audit.record(AuditRecord(
            time=self.clock(), identity=identity.name if identity else "", role=identity.role if identity else "",
            via=identity.via if identity else "none", method=clean_text(method, MAX_TARGET_CHARS),
            target=target, code=code,
            detail=clean_text(detail, MAX_DETAIL_CHARS), peer=clean_text(context.peer() or "", MAX_TARGET_CHARS)))


# ------------------------------------------------------------------ client side
def read_token_file(token_file: str) -> str:
    """The token kept in ``token_file`` (raises AuthError naming the flag if unreadable or empty)."""
    try:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise AuthError(f"--token-file: cannot read {token_file!r}: {exc}") from exc
    if not token:
        raise AuthError(f"--token-file: {token_file!r} is empty")
    return token


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """For blocking channels: ``grpc.intercept_channel(channel, TokenClientInterceptor(token))``.

    Adds ``authorization: Bearer <token>`` as call metadata, which works on TLS and
    (explicitly chosen) plaintext channels alike; gRPC's own call credentials refuse plaintext.
    """

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, list(details.metadata or []) + [self._header],
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def aio_token_interceptors(token: str) -> list:
    """For asyncio channels: ``grpc.aio.secure_channel(..., interceptors=aio_token_interceptors(token))``."""
    header = ("authorization", f"Bearer {token}")

    def add(details):
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ())), header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(add(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(add(details), request)

    return [UnaryUnary(), UnaryStream()]
