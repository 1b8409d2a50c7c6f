"""How long the cluster remembers a job, and when a PENDING job has waited in vain.

* Finished jobs (SUCCEEDED, FAILED, CANCELLED) are deleted, with every key of theirs
  (spec, status, plan, metrics, events, owner, submit request ids), once they have
  been finished for ``finished_job_retention_s``: without that, ListJobs and the
  watched mirror grow without bound (~16k jobs used to exceed gRPC's 4 MiB reply).
* A PENDING job that needs more workers than every registered node together has
  slots cannot be placed; after ``unplaceable_fail_after_s`` it is FAILED with the
  reason, and meanwhile it does not hold back other jobs' growth (controller/reconcile.py).

The decisions are pure functions of the job views and the time; ``RetentionSweeper``
(run by the leader's reconcile loop) acts on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

from common.etcd import EtcdError, EtcdUnavailable
from controller.handle import ControllerHandle
from controller.state import JobView
from protos.records import TERMINAL_PHASES

log = logging.getLogger("tenax.controller")


@dataclass(kw_only=True)
class RetentionSettings:
    finished_job_retention_s: float = 7 * 24 * 3600.0
    """How long a finished job stays listed (seconds after its last status change)."""
    sweep_interval_s: float = 30.0
    """Longest time between two sweeps for expired jobs (seconds)."""
    unplaceable_fail_after_s: float = 600.0
    """How long a job that needs more workers than the cluster has slots stays PENDING
    before it is FAILED with the reason (seconds after submit)."""

    def validate(self) -> "RetentionSettings":
        for name in ("finished_job_retention_s", "sweep_interval_s", "unplaceable_fail_after_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"retention.{name}: must be >= 0 seconds, got {getattr(self, name)}")
        return self


def expired_jobs(jobs: Iterable[JobView], now: float, retention_s: float) -> list[str]:
    """Ids of finished jobs whose last status change is older than ``retention_s``. Pure."""
    return sorted(j.id for j in jobs
                  if j.status.phase in TERMINAL_PHASES and now - j.status.updated >= retention_s)


def unplaceable_reason(world: int, cluster_slots: int) -> str | None:
    """Why a job of ``world`` workers can never be placed on ``cluster_slots``; None if it could. Pure."""
    if world > cluster_slots:
        return (f"waiting for {world} free slots, more than the {cluster_slots} the cluster has in all "
                f"(add nodes or submit with fewer workers)")
    return None


def unplaceable_decision(world: int, cluster_slots: int, pending_since: float, now: float,
                         fail_after_s: float) -> tuple[str, str] | None:
    """('FAILED', reason) once an unplaceable job has waited ``fail_after_s``; ('PENDING', reason)
    while it waits; None if the cluster could hold it. Pure."""
    reason = unplaceable_reason(world, cluster_slots)
    if reason is None:
        return None
    if now - pending_since >= fail_after_s:
        return "FAILED", f"cannot be placed: {reason}"
    return "PENDING", reason


class RetentionSweeper:
    """Deletes expired finished jobs (leader only; called from the reconcile loop)."""

    def __init__(self, handle: ControllerHandle, settings: RetentionSettings) -> None:
        self.c = handle
        self.settings = settings.validate()
        self._last_sweep = float("-inf")

    async def maybe_sweep(self, jobs: Iterable[JobView], now: float) -> int:
        """Sweep if the interval has passed; return how many jobs went. Never raises for etcd trouble."""
        if now - self._last_sweep < self.settings.sweep_interval_s:
            return 0
        self._last_sweep = now
        expired = expired_jobs(jobs, now, self.settings.finished_job_retention_s)
        if not expired:
            return 0
        k = self.c.keys
        try:
            requests = {kv.key: kv.value for kv in await self.c.etcd.get_prefix(k.submit_requests())}
            gone = set(expired)
            for job_id in expired:
                await self.c.etcd.delete_prefix(k.job(job_id))
                await self.c.etcd.delete(k.job_owner(job_id))
            for key, job_id in requests.items():
                if job_id in gone:
                    await self.c.etcd.delete(key)
        except (EtcdError, EtcdUnavailable) as exc:  # the next sweep tries again
            self._last_sweep = float("-inf")
            log.warning("retention sweep incomplete (will retry): %s", exc)
            return 0
        log.info("deleted %d finished job(s) older than %.0f s: %s", len(expired),
                 self.settings.finished_job_retention_s, ", ".join(expired[:10]))
        return len(expired)
