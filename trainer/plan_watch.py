"""The plan watch: follows the job's plan key in etcd on a thread of its own, so the
training loop only reads an attribute at each step boundary (principle 2)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from common.etcd import Etcd, EtcdError, EtcdTls, EtcdUnavailable
from common.retry import Backoff
from protos.plan import Plan, PlanError

log = logging.getLogger(__name__)

WAIT_LOG_EVERY_S = 5.0
"""A worker waiting for a newer plan says so (and why it may be late) this often (seconds)."""


class PlanWatcher:
    """Follows Keys.job_plan(job) in etcd on a thread with its own event loop.

    ``newest`` is the newest valid plan seen; ``on_plan(plan)`` runs on the watch
    thread for every newer generation. Malformed values are logged and skipped."""

    def __init__(self, endpoints: str, key: str, *, on_plan=None, tls: EtcdTls | None = None) -> None:
        self.endpoint = endpoints.split(",")[0].strip()
        self.key = key
        self.on_plan = on_plan
        self.tls = tls
        """etcd client TLS files (the agent passes its own: TENAX_ETCD_CA/CERT/KEY); None: plain."""
        self.stopped_by: EtcdError | None = None
        """The permanent etcd error that ended the watch (no newer plan will be seen), if any."""
        self.newest: Plan | None = None
        self.unreachable_since: float | None = None
        """time.monotonic() since when etcd cannot be reached (None: the watch is up)."""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._etcd = None
        """The watch's connection while it is up (``put`` borrows it)."""
        self._thread = threading.Thread(target=self._thread_main, name="plan-watcher", daemon=True)
        self._thread.start()

    def wait_newer(self, generation: int, timeout_s: float) -> Plan:
        """The newest plan with a generation above ``generation``; TimeoutError if none comes in time.
        While it waits it logs, every ``WAIT_LOG_EVERY_S``, what it waits for: etcd (unreachable)
        or the controller (etcd is up, no plan yet: no leader, or it is re-planning)."""
        started = time.monotonic()
        deadline, next_log = started + timeout_s, started + WAIT_LOG_EVERY_S
        with self._cond:
            while self.newest is None or self.newest.generation <= generation:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise TimeoutError(f"no plan newer than generation {generation} within {timeout_s:.0f}s"
                                       f"{self._why_late(now)}")
                if now >= next_log:
                    next_log = now + WAIT_LOG_EVERY_S
                    log.warning("waiting %.0f s for plan generation %d (%.0f s left)%s", now - started,
                                generation + 1, left, self._why_late(now))
                self._cond.wait(min(left, 0.5))
            return self.newest

    def _why_late(self, now: float) -> str:
        since = self.unreachable_since
        if since is not None:
            return f": etcd unreachable for {now - since:.0f} s; waiting for it"
        return ": etcd is up; waiting for the controller (no leader, or it is re-planning)"

    def close(self) -> None:
        self._stop.set()

    def put(self, key: str, value: str, *, timeout_s: float = 10.0) -> None:
        """Write one key through the watch's connection (on its thread); retries while etcd is
        unreachable (temporary), TimeoutError once ``timeout_s`` has passed; a permanent
        ``EtcdError`` (e.g. permission denied) is raised at once."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            loop, etcd = self._loop, self._etcd
            if loop is not None and etcd is not None:
                future = asyncio.run_coroutine_threadsafe(etcd.put(key, value), loop)
                try:
                    future.result(max(0.05, deadline - time.monotonic()))
                    return
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    break
                except EtcdError as exc:
                    log.warning("not writing %s: permanent etcd error: %r", key, exc)
                    raise
                except (EtcdUnavailable, RuntimeError) as exc:  # connection lost or being replaced: retry
                    last = exc
            time.sleep(0.05)
        raise TimeoutError(f"could not write {key} within {timeout_s:.0f} s: {last!r}")

    def _offer(self, raw: str) -> None:
        try:
            plan = Plan.from_json(raw)
        except PlanError as exc:
            log.warning("skipping malformed plan at %s: %s", self.key, exc)
            return
        with self._cond:
            if self.newest is not None and plan.generation <= self.newest.generation:
                return
            self.newest = plan
            self._cond.notify_all()
        if self.on_plan is not None:
            self.on_plan(plan)

    def _thread_main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                async with Etcd(self.endpoint, tls=self.tls) as etcd:
                    self._etcd = etcd
                    kv = await etcd.get(self.key)
                    self.unreachable_since = None
                    if kv is not None:
                        self._offer(kv.value)
                    start = kv.mod_revision + 1 if kv is not None else None
                    async for ev in etcd.watch_prefix(self.key, start_revision=start):
                        if ev.key == self.key and ev.kind == "put":
                            self._offer(ev.value)
                        backoff.reset()
                        if self._stop.is_set():
                            return
            except EtcdUnavailable as exc:
                log.debug("plan watch on %s interrupted: %r", self.key, exc)
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                await backoff.sleep()
            except EtcdError as exc:  # permanent (refused, bad TLS files): retrying cannot help
                log.error("plan watch on %s stopped: permanent etcd error: %r; no newer plan will be "
                          "seen (a failure now ends this worker once the plan wait runs out)", self.key, exc)
                self.stopped_by = exc
                return
            finally:
                self._etcd = None
