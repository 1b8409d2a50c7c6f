"""Limits on what one caller may ask of the job API: size, strings, jobs, call rate.

Every decision here is a pure function (or a small object with an injectable
clock), so the interceptor in controller/auth.py only asks and acts:

* request size        gRPC refuses bigger messages itself (``server_options``)
                      with RESOURCE_EXHAUSTED before any handler runs.
* string lengths      ``oversized_string`` finds a string field longer than
                      allowed anywhere in a request -> INVALID_ARGUMENT (the
                      JobSpec's own, tighter limits live in common/spec.py).
* jobs per user       ``jobs_per_user_problem`` -> RESOURCE_EXHAUSTED.
* call rate           ``RateLimiter`` (a token bucket per identity) -> RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


@dataclass(kw_only=True)
class Limits:
    """Per-caller limits of the job API."""

    max_request_bytes: int = 1 << 20
    """Largest request message the server accepts (bytes); a JobSpec is ~1 KiB."""
    max_metadata_bytes: int = 16 << 10
    """Largest request header block (bytes): tokens are ~60 bytes."""
    max_string_chars: int = 4096
    """Longest string in any request field (characters); JobSpec fields have tighter limits."""
    max_active_jobs_per_user: int = 32
    """Jobs one identity may have PENDING/RUNNING/RECOVERING at once (admins too: a runaway script is a runaway script)."""
    calls_per_s: float = 50.0
    """Sustained calls per second per identity (token bucket refill rate)."""
    burst: int = 100
    """Calls one identity may make at once before the rate applies (bucket size)."""
    max_tracked_callers: int = 10_000
    """Rate buckets kept in memory; the least recently seen caller is forgotten first."""

    def validate(self) -> "Limits":
        for name in ("max_request_bytes", "max_metadata_bytes", "max_string_chars", "max_active_jobs_per_user",
                     "burst", "max_tracked_callers"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.calls_per_s > 0:
            raise ValueError(f"limits.calls_per_s: must be > 0, got {self.calls_per_s}")
        return self


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC server options that enforce the size limits before any of our code runs."""
    return [
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
    ]


# ---------------------------------------------------------------- strings
def oversized_string(message: Message, limit: int, path: str = "") -> str | None:
    """The dotted path of the first string (or bytes) field longer than ``limit``; None if all fit.

    Walks nested messages, repeated fields and maps. Pure.
    """
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        found = _oversized_value(field, value, limit, name)
        if found:
            return found
    return None


def _oversized_value(field: FieldDescriptor, value, limit: int, name: str) -> str | None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(key, (str, bytes)) and len(key) > limit:
                return f"{name}[key]"
            if isinstance(item, Message):
                found = oversized_string(item, limit, f"{name}[]")
            else:
                found = f"{name}[]" if isinstance(item, (str, bytes)) and len(item) > limit else None
            if found:
                return found
        return None
    items = value if _is_repeated(field) else [value]
    for item in items:
        if isinstance(item, Message):
            found = oversized_string(item, limit, name)
            if found:
                return found
        elif isinstance(item, (str, bytes)) and len(item) > limit:
            return name
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated; older versions only the label
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


# ------------------------------------------------------------- jobs per user
def jobs_per_user_problem(active_jobs: int, limit: int) -> str | None:
    """Why one more job would break the limit; None if it fits. Pure."""
    if active_jobs >= limit:
        return (f"you already have {active_jobs} active jobs (limit {limit}); "
                f"wait for some to finish or cancel them")
    return None


# -------------------------------------------------------------- call rate
@dataclass
class TokenBucket:
    """``capacity`` calls at once, refilled at ``rate`` calls per second. Times in seconds."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        """Spend one call if there is one; the clock never runs backwards here."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next call would be allowed."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class RateLimiter:
    """One token bucket per caller key, bounded in memory (LRU)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits.validate()
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying) for one call by ``key``."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(rate=self.limits.calls_per_s, capacity=float(self.limits.burst),
                                 tokens=float(self.limits.burst), updated=now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.limits.max_tracked_callers:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        if bucket.take(now):
            return True, 0.0
        return False, bucket.retry_after()
