"""Goodput: a job's effective training time ratio (ETTR) and where the rest of its time went.

    ratio = productive_s / wall_s

* wall_s        submit -> now (-> the last status change for a finished job)
* productive_s  the step time of every committed step, counted once (the last run of a step
                that was re-run after a recovery)
* pending_s     submit -> the start of the first step (queueing, scheduling, process start-up)
* recovery_s    sum of the failure recoveries' MTTR (``total_s``: failure -> ready to train)
* replayed_s    step time of the runs of a step that were thrown away (a recovery resumed
                from an older snapshot and ran the step again)
* stall_s       the rest: time training stood still or did not show up as step time (a hang
                before it was detected, planned switches at a step boundary, snapshot and
                checkpoint overhead between steps)

The parts add up: productive + pending + recovery + replayed + stall = wall. The inputs are the
job's per-step records (metric batches in etcd, every run of every step in write order), its
status (created, updated) and its recovery entries. ``compute`` is pure; ``GoodputTracker``
re-reads a job's batches at most every ``refresh_s`` and feeds the API and Prometheus
(``tenax_job_goodput_ratio``, ``tenax_job_time_lost_seconds{cause}``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from common.etcd import Etcd, EtcdError, EtcdUnavailable
from controller import metrics
from controller.handle import ControllerHandle
from controller.state import JobView, read_prefix_paged
from protos.keys import Keys
from protos.records import TERMINAL_PHASES, MetricsBatch, RecordError, StepRecord

log = logging.getLogger("tenax.controller.goodput")

LOSS_CAUSES = ("pending", "recovery", "replayed", "stall")
"""Values of the ``cause`` label of ``tenax_job_time_lost_seconds``."""
REFRESH_S = 10.0
"""A job's step records are re-read at most this often (seconds)."""
FIRST_STEPS_REFRESH_S = 1.0
"""...and this often while an active job has none yet (seconds): its gauge read 0 for up to
``REFRESH_S`` after its first steps (read once at its start, before any step)."""


@dataclass(kw_only=True, frozen=True)
class Goodput:
    ratio: float
    wall_s: float
    productive_s: float
    pending_s: float
    recovery_s: float
    replayed_s: float
    stall_s: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def lost(self) -> dict[str, float]:
        return {cause: getattr(self, f"{cause}_s") for cause in LOSS_CAUSES}


def compute(*, created: float, end: float, steps: Sequence[StepRecord],
            recoveries: Sequence[Mapping[str, Any]]) -> Goodput:
    """ETTR of one job from every run of its steps (in the order they were written). Pure."""
    wall = max(end - created, 0.0)
    last: dict[int, float] = {}
    seen: set[tuple[int, int]] = set()
    replayed = 0.0
    for s in steps:
        if (s.step, s.generation) in seen:
            continue  # the same run again (a survivor re-sent it for a lost metrics rank)
        seen.add((s.step, s.generation))
        if s.step in last:
            replayed += last[s.step]  # the earlier run of this step was thrown away
        last[s.step] = max(s.step_time_s, 0.0)
    productive = sum(last.values())
    starts = [s.time - max(s.step_time_s, 0.0) for s in steps if s.time > 0]
    pending = min(max(min(starts) - created, 0.0), wall) if starts else wall
    # failures switch at once (switch_at_step -1); a planned switch's stall is part of stall_s
    recovery = sum(float(r.get("total_s", 0.0) or 0.0) for r in recoveries if _switch_step(r) < 0)
    productive = min(productive, wall)
    replayed = min(replayed, max(wall - productive, 0.0))
    pending = min(pending, max(wall - productive - replayed, 0.0))
    recovery = min(recovery, max(wall - productive - replayed - pending, 0.0))
    stall = max(wall - productive - replayed - pending - recovery, 0.0)
    return Goodput(ratio=productive / wall if wall > 0 else 0.0, wall_s=wall, productive_s=productive,
                   pending_s=pending, recovery_s=recovery, replayed_s=replayed, stall_s=stall)


def _switch_step(entry: Mapping[str, Any]) -> int:
    value = entry.get("switch_at_step", -1)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else -1


async def all_step_runs(etcd: Etcd, keys: Keys, job_id: str) -> list[StepRecord]:
    """Every per-step record of the job, re-runs included, in the order they were written."""
    out: list[StepRecord] = []
    batches = await read_prefix_paged(etcd, keys.job_metrics(job_id), lambda key: True, page=200)
    for kv in sorted(batches, key=lambda kv: kv.mod_revision):
        try:
            out += MetricsBatch.from_json(kv.value).steps
        except RecordError as exc:
            log.warning("skipping malformed metrics batch at %s: %s", kv.key, exc)
    return out


def job_end(job: JobView, now: float) -> float:
    return (job.status.updated or now) if job.status.phase in TERMINAL_PHASES else now


class GoodputTracker:
    """Per-job goodput on one replica, from its step records read at most every ``refresh_s``."""

    def __init__(self, handle: ControllerHandle, refresh_s: float = REFRESH_S) -> None:
        self.c = handle
        self.refresh_s = refresh_s
        self._steps: dict[str, tuple[float, list[StepRecord]]] = {}
        """job -> (unix time the records were read, every run of every step)."""

    async def get(self, job: JobView, now: float | None = None, *, fresh: bool = False) -> Goodput:
        now = time.time() if now is None else now
        cached = self._steps.get(job.id)
        stale = cached is None or now - cached[0] > self.refresh_s or \
            (not cached[1] and job.active and now - cached[0] > FIRST_STEPS_REFRESH_S) or \
            (not job.active and cached[0] < (job.status.updated or now) + 1.0)  # its last steps, once
        if fresh or stale:
            try:
                cached = (now, await all_step_runs(self.c.etcd, self.c.keys, job.id))
                self._steps[job.id] = cached
            except (EtcdError, EtcdUnavailable) as exc:
                log.debug("goodput of job %s: step records not read (%r); using what is known", job.id, exc)
                cached = cached or (0.0, [])
        return compute(created=job.status.created, end=job_end(job, now), steps=cached[1],
                       recoveries=job.status.recoveries)

    def cached(self, job: JobView, now: float | None = None) -> Goodput | None:
        """From the step records already read (no etcd call); None if none were read yet."""
        entry = self._steps.get(job.id)
        if entry is None:
            return None
        now = time.time() if now is None else now
        return compute(created=job.status.created, end=job_end(job, now), steps=entry[1],
                       recoveries=job.status.recoveries)

    async def refresh(self, jobs: Mapping[str, JobView], now: float) -> None:
        """Update the gauges of the active jobs; forget the rest."""
        for job in jobs.values():
            if not job.active or job.plan is None:
                continue
            g = await self.get(job, now)
            metrics.JOB_GOODPUT.labels(job.id).set(g.ratio)
            for cause, seconds in g.lost().items():
                metrics.JOB_TIME_LOST.labels(job.id, cause).set(seconds)
        for gone in set(self._steps) - set(jobs):
            del self._steps[gone]
