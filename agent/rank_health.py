"""Per-rank timing and liveness for the controller's hang and straggler detection.

The worker already writes one JSON line per step to its metrics file (the cheap
worker -> agent channel; trainer/telemetry.py adds compute/collective/data
times and a heartbeat line about once a second while a step runs). This
publisher tails those files on its own (the progress relay keeps only the
latest step; the straggler statistic needs every step of every rank) and, at
most once per ``interval_s``, writes ONE key per job and node,
``Keys.job_telemetry_node(job, node)``:

    {"node": ..., "time": ..., "ranks": {"<rank>": {
        "pid", "generation", "step", "progress_at", "heartbeat_at", "phase", "stopped",
        "arrived", "arrived_at", "startup_s",
        "steps": [[step, compute_s, collective_wait_s, step_time_s, generation], ...]}}}

``comm`` (issue #20) summarises the rank's last ``COMM_STEPS`` steps of its current generation
from the step lines' ``comm`` (trainer/comm.py): ``{"n": steps, "compute": median compute s,
"kind": {what: median wait s}, "peer": {"what|peer": median wait s}}``, rounded to 0.1 ms
and at most ``COMM_KEYS`` entries each (the largest), so a write stays a few hundred bytes
per rank (``comm_summary``); the controller attributes slowness to compute or to a link with
it (controller/attribution.py).

``steps`` holds the last ``KEEP_STEPS`` steps (not only the new ones), so a
write the controller misses costs nothing. ``stopped`` is the kernel's view of
the worker (state T: SIGSTOP), the strongest evidence of a hung rank. ``arrived`` /
``arrived_at``: the newest plan generation whose rendezvous the worker reached, and when
(its ``rendezvous`` line, protos/recovery.py ``ARRIVAL_EVENT``); ``startup_s``: its process
start-up (spawn -> first rendezvous). The controller's rendezvous deadline reads them.

One write per job per node per interval, never one per rank per step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.etcd import Etcd, EtcdError, EtcdUnavailable
from common.retry import Backoff
from protos.keys import Keys
from protos.recovery import ARRIVAL_EVENT

log = logging.getLogger("agent.rank_health")

KEEP_STEPS = 64
"""Recent steps per rank in each write (bounds the value at a few KiB)."""
READ_LIMIT = 1 << 20
"""Most bytes read from one metrics file per tick."""
COMM_STEPS = 20
"""Steps the ``comm`` summary of a rank spans (the controller's default straggler window)."""
COMM_KEYS = 12
"""Most kinds, and most peers, in one rank's ``comm`` summary (the largest waits are kept)."""
COMM_DIGITS = 4
"""Seconds in the ``comm`` summary are rounded to this many decimals (0.1 ms)."""


def process_stopped(pid: int) -> bool | None:
    """True if the kernel shows the process stopped by a signal (state T/t); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the state follows the command name in parentheses (which may itself hold spaces)
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"T", b"t")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def step_timing(record: dict[str, Any]) -> list[float] | None:
    """[step, compute_s, collective_wait_s, step_time_s, generation] from one metrics line; None if
    it is not a step line. Compute is forward + backward (the straggler statistic's input)."""
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    compute = _number(record.get("compute_time"))
    if compute is None:
        forward, backward = _number(record.get("forward_time")), _number(record.get("backward_time"))
        if forward is None or backward is None:
            return None
        compute = forward + backward
    wait = _number(record.get("collective_wait_time"))
    if wait is None:
        wait = _number(record.get("collective_time")) or 0.0
    return [step, compute, wait, _number(record.get("step_time")) or 0.0,
            int(_number(record.get("generation")) or 0)]


def _medians(dicts: list[dict], limit: int) -> dict[str, float]:
    """Per key, the median over ``dicts`` (a key missing from one counts as 0 there); the
    ``limit`` largest, rounded."""
    keys = {k for d in dicts for k in d}
    medians = {k: statistics.median(float(d.get(k, 0.0)) for d in dicts) for k in keys}
    top = sorted(medians, key=lambda k: (-medians[k], k))[:limit]
    return {k: round(medians[k], COMM_DIGITS) for k in sorted(top)}


def comm_summary(samples: list[tuple[int, float, dict]]) -> dict[str, Any] | None:
    """The ``comm`` entry of a rank from its recent ``(generation, compute_s, comm)`` samples
    (oldest first): medians over the newest generation's last ``COMM_STEPS``; None without
    samples. Pure."""
    if not samples:
        return None
    generation = samples[-1][0]
    recent = [s for s in samples if s[0] == generation][-COMM_STEPS:]
    kinds = [s[2].get("kind") if isinstance(s[2].get("kind"), dict) else {} for s in recent]
    peers = [s[2].get("peer") if isinstance(s[2].get("peer"), dict) else {} for s in recent]
    return {"n": len(recent), "generation": generation,
            "compute": round(statistics.median(s[1] for s in recent), COMM_DIGITS),
            "kind": _medians([{k: v for k, v in d.items() if _number(v) is not None} for d in kinds], COMM_KEYS),
            "peer": _medians([{k: v for k, v in d.items() if _number(v) is not None} for d in peers], COMM_KEYS)}


@dataclass
class RankTail:
    """What we know of one worker process (a restart is a new pid, a new tail)."""

    job: str
    rank: int
    pid: int
    generation: int
    path: Path
    offset: int
    started: float
    partial: bytes = b""
    steps: deque = field(default_factory=lambda: deque(maxlen=KEEP_STEPS))
    step: int = 0
    progress_at: float = 0.0
    heartbeat_at: float | None = None
    phase: str = ""
    comm: deque = field(default_factory=lambda: deque(maxlen=COMM_STEPS))
    """(generation, compute_s, the step line's ``comm``) of the recent steps that carry one."""
    arrived: int = 0
    """Newest plan generation whose rendezvous the worker reached (0: none yet)."""
    arrived_at: float | None = None
    startup_s: float | None = None

    def ingest(self, record: dict[str, Any]) -> bool:
        """One metrics line; True if it changed what we publish."""
        if record.get("event") == ARRIVAL_EVENT:
            generation, at = _number(record.get("generation")), _number(record.get("time"))
            if generation is None or at is None or generation < self.arrived:
                return False
            self.arrived, self.arrived_at = int(generation), at
            startup = _number(record.get("startup_s"))
            if startup is not None:
                self.startup_s = startup
            return True
        if "heartbeat" in record:
            at = _number(record.get("heartbeat"))
            if at is not None:
                self.heartbeat_at = at
                self.phase = str(record.get("phase", ""))[:32]
                return True
            return False
        timing = step_timing(record)
        if timing is None:
            return False
        self.steps.append(timing)
        if isinstance(record.get("comm"), dict):
            self.comm.append((int(timing[4]), timing[1], record["comm"]))
        self.step = int(timing[0])
        self.progress_at = _number(record.get("time")) or time.time()
        self.heartbeat_at = max(self.heartbeat_at or 0.0, self.progress_at)
        self.phase = "between steps"
        return True

    def read_new_lines(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(READ_LIMIT)
        except OSError:
            return False
        if not data:
            return False
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        changed = False
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the progress relay already logs malformed lines
            if isinstance(record, dict):
                changed = self.ingest(record) or changed
        return changed

    def summary(self, stopped: bool | None) -> dict[str, Any]:
        return {"pid": self.pid, "generation": self.generation, "step": self.step,
                "progress_at": self.progress_at or self.started, "heartbeat_at": self.heartbeat_at,
                "phase": self.phase, "stopped": stopped, "arrived": self.arrived, "arrived_at": self.arrived_at,
                "startup_s": self.startup_s, "steps": list(self.steps),
                **({"comm": summary} if (summary := comm_summary(list(self.comm))) else {})}


class RankHealthPublisher:
    def __init__(self, *, etcd: Etcd, keys: Keys, node_id: str, supervisor, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0 seconds, got {interval_s}")
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.tails: dict[tuple[str, int], RankTail] = {}
        self._published: dict[str, str] = {}
        """job -> the last value written (unchanged values are not written again)."""
        self.writes = 0

    async def run(self) -> None:
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                await self.tick()
                backoff.reset()
                await asyncio.sleep(self.interval_s)
            except EtcdUnavailable as exc:
                log.warning("rank telemetry not published (will retry): %r", exc)
                await backoff.sleep()
            except Exception:  # telemetry must never take the agent down
                log.exception("rank telemetry failed")
                await asyncio.sleep(self.interval_s)

    def _follow_workers(self) -> None:
        live = {}
        for (job, rank), w in list(self.supervisor.workers.items()):
            if not w.alive:
                continue
            live[(job, rank)] = w
            tail = self.tails.get((job, rank))
            if tail is None or tail.pid != w.pid:
                # A restarted rank appends to the same file: start where it ended when this
                # process was spawned (its first lines, e.g. its rendezvous arrival, count).
                offset = getattr(w, "metrics_offset", None)
                if offset is None:
                    try:
                        offset = w.metrics_path.stat().st_size
                    except OSError:
                        offset = 0
                self.tails[(job, rank)] = RankTail(job=job, rank=rank, pid=w.pid, generation=w.generation,
                                                   path=w.metrics_path, offset=offset, started=w.started)
            else:
                tail.generation = w.generation
        for key in [k for k in self.tails if k not in live]:
            del self.tails[key]

    async def tick(self) -> None:
        self._follow_workers()
        by_job: dict[str, dict[str, Any]] = {}
        for (job, rank), tail in self.tails.items():
            tail.read_new_lines()
            by_job.setdefault(job, {})[str(rank)] = tail.summary(process_stopped(tail.pid))
        for job, ranks in by_job.items():
            body = json.dumps(ranks, sort_keys=True)
            if self._published.get(job) == body:
                continue
            value = json.dumps({"node": self.node_id, "time": time.time(), "ranks": ranks}, sort_keys=True)
            try:
                await asyncio.wait_for(self.etcd.put(self.keys.job_telemetry_node(job, self.node_id), value), 5.0)
                self.writes += 1
            except EtcdError as exc:  # not retried: the next change of this job's ranks is written anew
                log.error("rank telemetry of job %s skipped, etcd refused it: %s", job, exc)
            self._published[job] = body
        for job in [j for j in self._published if j not in by_job]:
            try:
                await asyncio.wait_for(self.etcd.delete(self.keys.job_telemetry_node(job, self.node_id)), 5.0)
            except EtcdError as exc:
                log.error("rank telemetry of ended job %s left in etcd, etcd refused the delete: %s", job, exc)
            del self._published[job]
