"""The one module that talks to etcd (through ``aetcd``); nothing else imports aetcd.

Keys and values are ``str`` here (UTF-8 in etcd). Every call has a timeout.
Errors come in two kinds:

* ``EtcdUnavailable`` — temporary: etcd is down, restarting, partitioned or slow.
  Callers retry with backoff (``Backoff``) and must not crash.
* ``EtcdError`` — anything else etcd refused (bad argument, compacted revision):
  permanent for that call, never retried.

The two are siblings (neither subclasses the other): code that must survive
both names both.

Leases are kept alive by ``LeaseKeeper`` (aetcd does not do it for us): it
refreshes every ``ttl/3`` seconds and reports loss of the lease so the owner can
re-register with a new one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from common.retry import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


class EtcdError(Exception):
    """etcd refused a request (permanent for that request): retrying it cannot help."""


class EtcdUnavailable(Exception):
    """etcd could not be reached in time (temporary: retry with ``common.retry.Backoff``).

    A sibling of ``EtcdError``, not a subclass: a retry loop catches this one alone,
    so a permanent refusal is never retried forever."""


class LeaseLost(EtcdUnavailable):
    """The lease expired or was revoked; keys under it are gone."""


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: str
    """``put`` or ``delete``."""
    key: str
    value: str
    """The new value; empty for deletes."""
    mod_revision: int


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port`` (or ``host:port``) -> (host, port); ValueError if bad."""
    first = url.split(",")[0].strip()
    if "://" not in first:
        first = "http://" + first
    parsed = urlparse(first)
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"etcd endpoint must look like http://host:port, got {url!r}")
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint scheme must be http or https, got {parsed.scheme!r}")
    return parsed.hostname, parsed.port


_TEMPORARY = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    asyncio.TimeoutError,
    TimeoutError,
    ConnectionError,
    OSError,
)


def _translate(exc: BaseException, what: str) -> EtcdError | EtcdUnavailable:
    if isinstance(exc, _TEMPORARY):
        return EtcdUnavailable(f"etcd unavailable during {what}: {exc!r}")
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED):
            return EtcdUnavailable(f"etcd unavailable during {what}: {exc.code().name}")
        if exc.code() == grpc.StatusCode.NOT_FOUND and "lease" in (exc.details() or ""):
            return LeaseLost(f"lease not found during {what}")
    if isinstance(exc, aetcd.exceptions.ClientError) and "lease not found" in str(exc):
        return LeaseLost(f"lease not found during {what}")
    if isinstance(exc, aetcd.exceptions.InternalError):
        return EtcdUnavailable(f"etcd internal error during {what}: {exc!r}")
    return EtcdError(f"etcd refused {what}: {exc!r}")


@dataclass(frozen=True)
class EtcdTls:
    """TLS for etcd client connections (PEM files)."""

    ca_file: str
    """CA that signed etcd's server certificate."""
    cert_file: str = ""
    """Client certificate, for an etcd started with --client-cert-auth."""
    key_file: str = ""
    """Private key of ``cert_file``."""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:  # permanent: a wrong path does not fix itself
                raise EtcdError(f"cannot read etcd TLS file {path!r}: {exc}") from exc

        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("etcd TLS: give both cert_file and key_file, or neither")
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))


class _TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel.

    aetcd only builds insecure channels. gRPC channels connect lazily, so right
    after aetcd's own ``connect`` (before any call) we swap in a secure channel
    and rebuild the stubs on it; nothing was ever sent on the insecure one.
    """

    def __init__(self, tls: EtcdTls, **kwargs) -> None:
        super().__init__(**kwargs)
        self._credentials = tls.credentials()

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        await super().connect()
        if self.auth_stub is not None:  # etcd user/password auth is not used by Tenax
            raise EtcdError("etcd password auth is not supported together with TLS")
        unused = self.channel
        # No await between super().connect() and the swap: no other task can see the old stubs.
        self.channel = aetcd.rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                options=self._options.items())
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout,
                                              metadata=self.metadata)
        await unused.close()


class Etcd:
    """An asyncio etcd client with timeouts and typed errors.

    Use ``async with Etcd(url) as etcd:``. After etcd restarts, the underlying
    gRPC channel reconnects by itself; a call made while it is down raises
    ``EtcdUnavailable``.
    """

    def __init__(self, endpoint: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tls: "EtcdTls | None" = None) -> None:
        self.endpoint = endpoint
        self.host, self.port = parse_endpoint(endpoint)
        self.timeout_s = timeout_s
        if endpoint.strip().startswith("https://") and tls is None:
            raise ValueError(f"etcd endpoint {endpoint!r} is https: pass tls=EtcdTls(ca_file=...)")
        if tls is None:
            self._client = aetcd.Client(host=self.host, port=self.port, timeout=timeout_s)
        else:
            self._client = _TlsClient(tls, host=self.host, port=self.port, timeout=timeout_s)

    async def __aenter__(self) -> "Etcd":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._call("connect", self._client.connect())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.close(), self.timeout_s)
        except Exception as exc:  # closing must never raise
            log.debug("etcd close: %r", exc)

    async def _call(self, what: str, coro: Awaitable, timeout_s: float | None = None):
        try:
            return await asyncio.wait_for(coro, timeout_s or self.timeout_s)
        except (EtcdError, EtcdUnavailable):
            raise
        except Exception as exc:
            raise _translate(exc, what) from exc

    # ------------------------------------------------------------- key/value
    async def get(self, key: str) -> KV | None:
        res = await self._call(f"get {key}", self._client.get(key.encode()))
        return _kv(res) if res is not None else None

    async def get_prefix(self, prefix: str) -> list[KV]:
        res = await self._call(f"get_prefix {prefix}", self._client.get_prefix(prefix.encode()))
        return [_kv(item) for item in res]

    async def put(self, key: str, value: str, *, lease: int | None = None) -> int:
        """Write ``key``; return the new revision."""
        res = await self._call(f"put {key}", self._client.put(key.encode(), value.encode(), lease=lease))
        return res.header.revision

    async def delete(self, key: str) -> bool:
        res = await self._call(f"delete {key}", self._client.delete(key.encode()))
        return bool(res and res.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        res = await self._call(f"delete_prefix {prefix}", self._client.delete_prefix(prefix.encode()))
        return int(res.deleted) if res else 0

    async def keys_prefix(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` in key order, without their values (cheap listing)."""
        res = await self._call(f"keys_prefix {prefix}", self._client.get_prefix(prefix.encode(), keys_only=True))
        return [_kv(item).key for item in res]

    async def get_range(self, start: str, end: str) -> list[KV]:
        """Keys in ``[start, end)`` in key order."""
        res = await self._call(f"get_range {start}", self._client.get_range(start.encode(), end.encode()))
        return [_kv(item) for item in res]

    async def delete_range(self, start: str, end: str) -> int:
        """Delete keys in ``[start, end)``; return how many were deleted."""
        res = await self._call(f"delete_range {start}", self._client.delete_range(start.encode(), end.encode()))
        return int(res.deleted) if res else 0

    async def create(self, key: str, value: str, *, lease: int | None = None) -> bool:
        """Put ``key`` only if it does not exist. True if written."""
        tx = self._client.transactions
        ok, _ = await self._call(
            f"create {key}",
            self._client.transaction(
                compare=[tx.version(key.encode()) == 0],
                success=[tx.put(key.encode(), value.encode(), lease=lease)],
                failure=[],
            ),
        )
        return bool(ok)

    async def put_if_revision(self, key: str, value: str, mod_revision: int, *, lease: int | None = None) -> bool:
        """Compare-and-swap: write only if ``key`` still has ``mod_revision`` (0: absent)."""
        tx = self._client.transactions
        compare = tx.version(key.encode()) == 0 if mod_revision == 0 else tx.mod(key.encode()) == mod_revision
        ok, _ = await self._call(
            f"cas {key}",
            self._client.transaction(
                compare=[compare],
                success=[tx.put(key.encode(), value.encode(), lease=lease)],
                failure=[],
            ),
        )
        return bool(ok)

    async def put_many_if(self, guard_key: str, guard_revision: int, puts: dict[str, str]) -> bool:
        """Write all ``puts`` in one transaction if ``guard_key`` has ``guard_revision`` (0: absent)."""
        tx = self._client.transactions
        gk = guard_key.encode()
        compare = tx.version(gk) == 0 if guard_revision == 0 else tx.mod(gk) == guard_revision
        ok, _ = await self._call(
            f"txn guarded by {guard_key}",
            self._client.transaction(
                compare=[compare],
                success=[tx.put(k.encode(), v.encode()) for k, v in puts.items()],
                failure=[],
            ),
        )
        return bool(ok)

    async def put_many_guarded(self, guards: dict[str, int], puts: dict[str, str],
                               deletes: tuple[str, ...] = ()) -> bool:
        """Write all ``puts`` and delete ``deletes`` in one transaction if every guard key has its
        revision (0: absent)."""
        tx = self._client.transactions
        compare = [tx.version(k.encode()) == 0 if rev == 0 else tx.mod(k.encode()) == rev
                   for k, rev in guards.items()]
        ok, _ = await self._call(
            f"txn guarded by {', '.join(guards)}",
            self._client.transaction(
                compare=compare,
                success=[tx.put(k.encode(), v.encode()) for k, v in puts.items()]
                + [tx.delete(k.encode()) for k in deletes],
                failure=[],
            ),
        )
        return bool(ok)

    # ------------------------------------------------------------------ leases
    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call("lease grant", self._client.lease(int(ttl_s)))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh; return the remaining TTL. Raises LeaseLost if it expired."""
        res = await self._call("lease refresh", self._client.refresh_lease(lease_id))
        ttl = getattr(res, "TTL", None)
        if ttl is None:  # aetcd yields the keepalive response
            ttl = res.TTL
        if ttl <= 0:
            raise LeaseLost(f"lease {lease_id:x} expired")
        return int(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("lease revoke", self._client.revoke_lease(lease_id))

    # ------------------------------------------------------------------ watch
    async def watch_prefix(self, prefix: str, *, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        """Yield events under ``prefix`` until cancelled. Raises EtcdUnavailable if the stream breaks."""
        try:
            watch = await asyncio.wait_for(
                self._client.watch_prefix(prefix.encode(), start_revision=start_revision), self.timeout_s
            )
        except Exception as exc:
            raise _translate(exc, f"watch {prefix}") from exc
        try:
            async for ev in watch:
                kind = "put" if ev.kind == aetcd.rtypes.EventKind.PUT else "delete"
                yield WatchEvent(
                    kind=kind,
                    key=ev.kv.key.decode(),
                    value=ev.kv.value.decode(errors="replace") if kind == "put" else "",
                    mod_revision=ev.kv.mod_revision,
                )
        except (EtcdError, EtcdUnavailable):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc, f"watch {prefix}") from exc
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except BaseException as exc:  # the stream may already be gone
                log.debug("watch cancel: %r", exc)

    async def revision(self) -> int:
        res = await self._call("status", self._client.status())
        return int(res.raft_index) if hasattr(res, "raft_index") else 0


def _kv(item) -> KV:
    # aetcd returns Get objects (with .key/.value) or (value, meta) tuples.
    if isinstance(item, tuple):
        value, meta = item
        key = meta.key
    else:
        value, key, meta = item.value, item.key, item
    return KV(
        key=key.decode(),
        value=value.decode(errors="replace"),
        mod_revision=int(meta.mod_revision),
        create_revision=int(meta.create_revision),
        lease=int(meta.lease),
    )


class LeaseKeeper:
    """Keeps one lease alive: refresh every ttl/3 seconds.

    ``on_lost`` is awaited once when the lease cannot be kept (expired, revoked,
    or etcd unreachable for longer than the TTL); the keeper then stops. The
    owner decides what to do (re-register with a new lease).
    """

    def __init__(self, etcd: Etcd, lease_id: int, ttl_s: float,
                 on_lost: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.etcd = etcd
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.lease_id:x}")

    async def stop(self, *, revoke: bool = False) -> None:
        await cancel_and_wait(self._task)
        if revoke:
            try:
                await self.etcd.revoke_lease(self.lease_id)
            except (EtcdError, EtcdUnavailable) as exc:
                log.debug("revoke lease: %r", exc)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        interval = self.ttl_s / 3
        reason = ""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.etcd.refresh_lease(self.lease_id), max(interval, 0.5))
                last_ok = loop.time()
            except LeaseLost as exc:
                reason = str(exc)
                break
            except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
                if loop.time() - last_ok > self.ttl_s:
                    reason = f"could not refresh for longer than the TTL: {exc!r}"
                    break
                log.warning("lease %x refresh failed (will retry): %r", self.lease_id, exc)
        log.warning("lease %x lost: %s", self.lease_id, reason)
        if self.on_lost:
            await self.on_lost(reason)
