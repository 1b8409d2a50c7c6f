"""The plan watch: follows the job's plan file on a thread of its own, so the training loop
only reads an attribute at each step boundary (principle 2).

The agent relays every newer plan of the job from etcd into the file named by
``TENAX_PLAN_FILE`` (protos/launch.py), replacing it atomically, so a worker needs no etcd
access and holds no etcd credentials. The thread polls the file's identity (inode, mtime,
size) every ``POLL_S``: a stat costs microseconds, and a plan is seen at most ``POLL_S``
after the agent wrote it (this is on the recovery path).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from protos.plan import Plan, PlanError

log = logging.getLogger(__name__)

POLL_S = 0.02
"""Seconds between two looks at the plan file (the latency it adds to a recovery: half of it
on average)."""

WAIT_LOG_EVERY_S = 5.0
"""A worker waiting for a newer plan says so (and what it waits for) this often (seconds)."""


class PlanWatcher:
    """Follows the plan file at ``path`` on a thread.

    ``newest`` is the newest valid plan seen; ``on_plan(plan)`` runs on the watch thread
    for every newer generation. Malformed contents are logged and skipped."""

    def __init__(self, path: str | Path, *, on_plan=None, poll_s: float = POLL_S) -> None:
        self.path = Path(path)
        self.on_plan = on_plan
        self.poll_s = poll_s
        self.newest: Plan | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._seen: tuple[int, int, int] | None = None
        """(inode, mtime ns, size) of the file last read."""
        self._thread = threading.Thread(target=self._run, name="plan-watcher", daemon=True)
        self._thread.start()

    def wait_newer(self, generation: int, timeout_s: float) -> Plan:
        """The newest plan with a generation above ``generation``; TimeoutError if none comes in time.
        While it waits it logs, every ``WAIT_LOG_EVERY_S``, what it waits for."""
        started = time.monotonic()
        deadline, next_log = started + timeout_s, started + WAIT_LOG_EVERY_S
        with self._cond:
            while self.newest is None or self.newest.generation <= generation:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise TimeoutError(f"no plan newer than generation {generation} within {timeout_s:.0f}s"
                                       f"{self._why_late()}")
                if now >= next_log:
                    next_log = now + WAIT_LOG_EVERY_S
                    log.warning("waiting %.0f s for plan generation %d (%.0f s left)%s", now - started,
                                generation + 1, left, self._why_late())
                self._cond.wait(min(left, 0.5))
            return self.newest

    def _why_late(self) -> str:
        return (f": waiting for the controller to write it and the agent to relay it into {self.path} "
                "(the agent's log says whether etcd or the controller is away)")

    def close(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """Read the file if it changed since the last look (the thread calls this every ``poll_s``)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if identity == self._seen:
            return
        try:
            raw = self.path.read_text()
        except OSError as exc:  # replaced between the stat and the read: the next look reads the new one
            log.debug("plan file %s not read: %r", self.path, exc)
            return
        self._seen = identity
        self._offer(raw)

    def _offer(self, raw: str) -> None:
        try:
            plan = Plan.from_json(raw)
        except PlanError as exc:
            log.warning("skipping malformed plan in %s: %s", self.path, exc)
            return
        with self._cond:
            if self.newest is not None and plan.generation <= self.newest.generation:
                return
            self.newest = plan
            self._cond.notify_all()
        if self.on_plan is not None:
            self.on_plan(plan)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bug must not end the watch silently
                log.exception("plan watch on %s failed; retrying", self.path)
            self._stop.wait(self.poll_s)
