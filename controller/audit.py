"""The audit log: one etcd record per mutating call (who, what, on what, when, result).

Records live under ``Keys.audit()`` with keys that sort by time, so the oldest
come first in a range read and trimming is one ``delete_range``. Retention is
bounded both by count and by age (``AuditSettings``); the writer trims every
``trim_every`` writes, so the log never grows without bound even if nobody
reads it, at the price of one keys-only range read per ``trim_every`` calls.

Writing an audit record never fails the call it describes: if etcd is down the
record is logged (at ERROR, with the full record) and counted in
``AuditLog.failed``. Clients read the log through ``AuditService.ListAudit``
(admins only, see controller/auth.py); they never talk to etcd.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Callable

import grpc

from common.etcd import Etcd, EtcdError, EtcdUnavailable
from protos import tenax_pb2, tenax_pb2_grpc
from protos.keys import Keys

log = logging.getLogger(__name__)

MAX_TARGET_CHARS = 128
MAX_DETAIL_CHARS = 256
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 10_000


@dataclass(kw_only=True)
class AuditSettings:
    """Retention of the audit log."""

    max_records: int = 10_000
    """Most records kept (count); the oldest go first."""
    max_age_s: float = 30 * 24 * 3600.0
    """Oldest record kept (seconds)."""
    trim_every: int = 64
    """Writes between two trims (calls); 1 trims on every write."""
    refused_window_s: float = 60.0
    """Refused calls without valid credentials are counted over this window (seconds) and then
    written as one record per (source, method, result), under their own key prefix."""
    max_refused_records: int = 2_000
    """Most aggregated refused-call records kept (count); they never count against ``max_records``."""
    max_refused_sources: int = 200
    """Distinct (source, method, result) counted in one window; the rest count as '(other sources)'."""

    def validate(self) -> "AuditSettings":
        for name in ("max_refused_records", "max_refused_sources"):
            if getattr(self, name) < 1:
                raise ValueError(f"audit.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.refused_window_s > 0:
            raise ValueError(f"audit.refused_window_s: must be > 0 seconds, got {self.refused_window_s}")
        if self.max_records < 1:
            raise ValueError(f"audit.max_records: must be >= 1, got {self.max_records}")
        if not self.max_age_s > 0:
            raise ValueError(f"audit.max_age_s: must be > 0, got {self.max_age_s}")
        if self.trim_every < 1:
            raise ValueError(f"audit.trim_every: must be >= 1, got {self.trim_every}")
        return self


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    time: float
    """Unix seconds when the call finished."""
    identity: str
    role: str
    via: str
    method: str
    target: str
    code: str
    detail: str = ""
    peer: str = ""
    count: int = 1
    """Calls this record stands for (> 1 only for aggregated refused calls)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AuditRecord":
        """Parse a stored record; ValueError on anything malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"audit record is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("audit record is not an object")
        if not isinstance(data.get("time"), (int, float)) or isinstance(data.get("time"), bool):
            raise ValueError("audit record has no numeric time")
        fields = {}
        for name in ("identity", "role", "via", "method", "target", "code", "detail", "peer"):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise ValueError(f"audit record field {name} is not a string")
            fields[name] = value
        count = data.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("audit record field count is not a positive integer")
        return cls(time=float(data["time"]), count=count, **fields)

    def to_proto(self) -> tenax_pb2.AuditRecord:
        return tenax_pb2.AuditRecord(**asdict(self))


def clean_text(value: object, limit: int) -> str:
    """Printable, single-line, at most ``limit`` characters: safe to store and to print in a terminal."""
    text = value if isinstance(value, str) else str(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ retention
def time_of_key(key: str) -> int | None:
    """The nanosecond timestamp in an audit key (``.../<time_ns:020d>-<rand>``); None if malformed."""
    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(stamp) if len(stamp) == 20 and stamp.isdigit() else None


def first_key_to_keep(keys: list[str], now_s: float, settings: AuditSettings) -> str | None:
    """Given all audit keys in order, the first key that survives retention; None if all go. Pure.

    Everything before it goes: the excess over ``max_records`` (oldest first),
    records older than ``max_age_s``, and malformed keys mixed in among them.
    """
    cutoff_ns = int((now_s - settings.max_age_s) * 1e9)
    start = max(0, len(keys) - settings.max_records)
    for index in range(start, len(keys)):
        stamp = time_of_key(keys[index])
        if stamp is not None and stamp >= cutoff_ns:
            return keys[index]
    return None


def prefix_end(prefix: str) -> str:
    """The smallest key after every key starting with ``prefix`` (for range reads)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class AuditLog:
    """Writes, trims and reads audit records in etcd."""

    def __init__(self, etcd: Etcd, keys: Keys, settings: AuditSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.etcd = etcd
        self.keys = keys
        self.settings = (settings or AuditSettings()).validate()
        self.clock = clock
        self.written = 0
        """Records written since start."""
        self.failed = 0
        """Records that could not be written (etcd down); each was logged at ERROR instead."""
        self._refused: dict[tuple[str, str, str], int] = {}
        self._window_start: float | None = None

    async def refused(self, *, source: str, method: str, code: str) -> None:
        """Count one refused call without valid credentials; written aggregated (see AuditSettings).
        Never raises."""
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
        key = (source, method, code)
        if key not in self._refused and len(self._refused) >= self.settings.max_refused_sources:
            key = ("(other sources)", method, code)
        self._refused[key] = self._refused.get(key, 0) + 1
        if now - self._window_start >= self.settings.refused_window_s:
            await self.flush_refused()

    async def flush_refused(self) -> int:
        """Write the counted refused calls now (one record per source, method and result); never raises."""
        pending, self._refused = self._refused, {}
        start, self._window_start = self._window_start, None
        if not pending or start is None:
            return 0
        now = self.clock()
        written = 0
        for (source, method, code), count in sorted(pending.items()):
            record = AuditRecord(
                time=now, identity="", role="", via="none", method=method, target="", code=code, peer=source,
                count=count, detail=f"{count} call(s) without valid credentials refused in {now - start:.0f} s "
                                    f"(counted, not stored one by one)")
            key = self.keys.audit_refused_record(int(now * 1e9), secrets.token_hex(4))
            try:
                await self.etcd.put(key, record.to_json())
                written += 1
            except (EtcdError, EtcdUnavailable) as exc:
                self.failed += 1
                log.error("audit record not stored (%s): %s", exc, record.to_json())
        await self._trim(self.keys.audit_refused(), AuditSettings(
            max_records=self.settings.max_refused_records, max_age_s=self.settings.max_age_s))
        return written

    async def record(self, record: AuditRecord) -> None:
        """Store one record; never raises (see module docstring)."""
        key = self.keys.audit_record(int(record.time * 1e9), secrets.token_hex(4))
        try:
            await self.etcd.put(key, record.to_json())
        except (EtcdError, EtcdUnavailable) as exc:
            self.failed += 1
            log.error("audit record not stored (%s): %s", exc, record.to_json())
            return
        self.written += 1
        if self.written % self.settings.trim_every == 0:
            await self.trim()
        start = self._window_start
        if start is not None and self.clock() - start >= self.settings.refused_window_s:
            await self.flush_refused()  # a window that ended while no refused call came to close it

    async def trim(self) -> int:
        """Apply retention now; return how many records went. Never raises."""
        return await self._trim(self.keys.audit(), self.settings)

    async def _trim(self, prefix: str, settings: AuditSettings) -> int:
        try:
            keys = await self.etcd.keys_prefix(prefix)
            keep = first_key_to_keep(keys, self.clock(), settings)
            if keep == (keys[0] if keys else None):
                return 0
            return await self.etcd.delete_range(prefix, keep or prefix_end(prefix))
        except (EtcdError, EtcdUnavailable) as exc:  # temporary: the next trim catches up
            log.warning("audit trim failed (will retry on a later write): %s", exc)
            return 0

    async def newest(self, limit: int) -> list[AuditRecord]:
        """Up to ``limit`` records, newest first, the aggregated refused calls (counted so far
        included) among them; malformed ones are logged and skipped. Raises EtcdError."""
        await self.flush_refused()
        records = await self._newest(self.keys.audit(), limit) + await self._newest(self.keys.audit_refused(), limit)
        records.sort(key=lambda r: r.time, reverse=True)
        return records[:limit]

    async def _newest(self, prefix: str, limit: int) -> list[AuditRecord]:
        keys = await self.etcd.keys_prefix(prefix)
        if not keys:
            return []
        kvs = await self.etcd.get_range(keys[max(0, len(keys) - limit)], prefix_end(prefix))
        records = []
        for kv in reversed(kvs):
            try:
                records.append(AuditRecord.from_json(kv.value))
            except ValueError as exc:
                log.warning("skipping malformed audit record %s: %s", kv.key, exc)
        return records


def list_limit(requested: int) -> int:
    """The number of records to return for a ListAudit ``limit``. Pure."""
    if requested <= 0:
        return DEFAULT_LIST_LIMIT
    return min(requested, MAX_LIST_LIMIT)


class AuditServicer(tenax_pb2_grpc.AuditServiceServicer):
    """``ListAudit``: the newest records. Who may call it is decided by the interceptor (admins)."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    async def ListAudit(self, request: tenax_pb2.ListAuditRequest, context: grpc.aio.ServicerContext):
        try:
            records = await self.audit.newest(list_limit(request.limit))
        except EtcdUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit log unavailable, retry: {exc}")
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"audit log unreadable: {exc}")
        return tenax_pb2.ListAuditResponse(records=[r.to_proto() for r in records])


def add_audit_service(server: grpc.aio.Server, audit: AuditLog) -> None:
    tenax_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit), server)
