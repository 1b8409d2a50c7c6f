"""A watched, in-memory mirror of the cluster's etcd keys, and the views built from it.

Every replica keeps one (``ClusterCache``): it loads the prefix once, then
follows one etcd watch. It is only a cache: a restart rebuilds it from etcd,
so the controller keeps no state of its own (DESIGN principle 1). Per-step
metric batches and explicit job events are not mirrored (they grow with the
job); they are read from etcd on request.

Malformed values are logged once per revision and skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from controller.decisions import Progress, fold_progress, node_state
from common.etcd import KV, Etcd, EtcdError, EtcdUnavailable, WatchEvent
from common.retry import Backoff
from protos.keys import Keys
from protos.plan import Plan
from protos.records import (
    TERMINAL_PHASES,
    CordonRecord,
    GrowthRecord,
    JobStatusRecord,
    JoinerRecord,
    MetricsBatch,
    NodeHealthRecord,
    NodeRecord,
    ProgressRecord,
    RecordError,
    RegistryRecord,
    StepRecord,
    WorkerStatusRecord,
)
from common.spec import JobSpec

log = logging.getLogger(__name__)

_NOT_MIRRORED = ("/metrics/", "/events/")


class ClusterCache:
    """key -> (value, mod_revision) for the keys the controller decides on (see ``mirrors``)."""

    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.keys = keys
        self.data: dict[str, tuple[str, int]] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.synced_at = 0.0
        """Unix time the mirror last became synced (its first load, or its reload after a broken
        watch): what it held before could not change while etcd was away (controller/health_loop.py)."""
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[WatchEvent], None]] = []
        self._warned: set[tuple[str, int]] = set()
        self._mirrored = (keys.nodes(), keys.registry(), keys.cordons(), keys.jobs(), keys.leader())
        self._memo: dict[str, tuple[int, Any]] = {}
        """key -> (mod_revision, parsed record or None): each value is parsed once per revision."""

    def mirrors(self, key: str) -> bool:
        """Only what the controller decides on: nodes, registry, cordons, leader, and jobs
        without their metric batches and event logs (audit records and tokens stay out)."""
        return key.startswith(self._mirrored) and not _excluded(key)

    def add_listener(self, fn: Callable[[WatchEvent], None]) -> None:
        """``fn(event)`` is called (synchronously, keep it cheap) for every mirrored change."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[WatchEvent], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def warn_malformed(self, key: str, problem: str) -> None:
        """Log a malformed value once per (key, revision), then stay quiet about it."""
        rev = self.data.get(key, ("", 0))[1]
        if (key, rev) not in self._warned:
            self._warned.add((key, rev))
            log.warning("skipping malformed value at %s (revision %d): %s", key, rev, problem)

    async def run(self) -> None:
        """Load and follow etcd until cancelled; reloads after a broken watch."""
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                start = await self._load()
                backoff.reset()
                async for ev in self.etcd.watch_prefix(self.keys.prefix + "/", start_revision=start):
                    self._apply(ev)
                    await self._notify()
            except EtcdUnavailable as exc:
                log.warning("cluster watch broken (will reload): %s", exc)
                self.synced.clear()
                await backoff.sleep()
            except EtcdError as exc:
                # permanent for that request (e.g. a watch from a compacted revision): it is not
                # repeated; the mirror starts over from a fresh snapshot at a new revision
                log.error("cluster mirror: etcd refused a load or watch (%s); reloading from a new snapshot", exc)
                self.synced.clear()
                await backoff.sleep()

    async def _load(self) -> int:
        # The store's revision *before* the snapshot: watching from just after it
        # replays every write the snapshot might have missed (replays are idempotent).
        before = await self.current_revision()
        items = await read_prefix_paged(self.etcd, self.keys.prefix + "/", self.mirrors)
        fresh = {kv.key: (kv.value, kv.mod_revision) for kv in items}
        removed = set(self.data) - set(fresh)
        self.data = fresh
        for key in removed:
            self._memo.pop(key, None)
        top = max([before] + [kv.mod_revision for kv in items])
        self.revision = max(self.revision, top)
        for key in removed:
            for fn in self._listeners:
                fn(WatchEvent(kind="delete", key=key, value="", mod_revision=top))
        for key, (value, rev) in fresh.items():
            for fn in self._listeners:
                fn(WatchEvent(kind="put", key=key, value=value, mod_revision=rev))
        self.synced_at = time.time()
        self.synced.set()
        await self._notify()
        return before + 1

    async def current_revision(self) -> int:
        """The store's current revision (put+delete of a scratch key; the put's revision)."""
        rev = await self.etcd.put(self.keys.revision_probe(), "")
        await self.etcd.delete(self.keys.revision_probe())
        return rev

    def _apply(self, ev: WatchEvent) -> None:
        self.revision = max(self.revision, ev.mod_revision)
        if not self.mirrors(ev.key):
            return
        if ev.kind == "put":
            self.data[ev.key] = (ev.value, ev.mod_revision)
        else:
            self.data.pop(ev.key, None)
            self._memo.pop(ev.key, None)
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:  # a listener bug must not stop the mirror
                log.exception("cache listener failed on %s", ev.key)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_revision(self, revision: int, timeout_s: float = 2.0) -> bool:
        """Wait until the mirror has seen ``revision`` (read-your-writes for one replica)."""
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.revision >= revision)
        try:
            await asyncio.wait_for(_wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def parse(self, key: str, raw: str, parser: Callable[[str], Any]) -> Any:
        """``parser(raw)`` memoized per (key, revision); None (logged once) if malformed."""
        rev = self.data.get(key, ("", -1))[1]
        memo = self._memo.get(key)
        if memo is not None and memo[0] == rev and rev >= 0:
            return memo[1]
        try:
            record = parser(raw)
        except ValueError as exc:
            self.warn_malformed(key, str(exc))
            record = None
        if rev >= 0:
            self._memo[key] = (rev, record)
        return record

    def prefixed(self, prefix: str) -> dict[str, str]:
        return {k: v for k, (v, _) in self.data.items() if k.startswith(prefix)}

    def get(self, key: str) -> str | None:
        item = self.data.get(key)
        return item[0] if item else None


async def read_prefix_paged(etcd: Etcd, prefix: str, keep: Callable[[str], bool], page: int = 500) -> list[KV]:
    """The values of the kept keys under ``prefix``, read in pages.

    One range read of a big prefix can exceed gRPC's 4 MiB message limit (about
    10k nodes with telemetry), so: list the keys (keys only, small), then read
    runs of at most ``page`` consecutive kept keys; skipped keys (metric batches)
    are never transferred. Pages are read at different revisions: callers watch
    from a revision taken before the listing, which replays anything newer.
    """
    keys = await etcd.keys_prefix(prefix)
    runs: list[list[str]] = [[]]
    for key in keys:
        if not keep(key):
            if runs[-1]:
                runs.append([])
            continue
        if len(runs[-1]) >= page:
            runs.append([])
        runs[-1].append(key)
    items: list[KV] = []
    for run in runs:
        if run:
            items += [kv for kv in await etcd.get_range(run[0], run[-1] + "\0") if keep(kv.key)]
    return items


def _excluded(key: str) -> bool:
    return any(part in key for part in _NOT_MIRRORED) and "/jobs/" in key


# ------------------------------------------------------------------ views
@dataclass(kw_only=True)
class JobView:
    id: str
    spec: JobSpec
    status: JobStatusRecord
    plan: Plan | None = None
    cancelled: bool = False
    workers: dict[int, WorkerStatusRecord] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    progress_ranks: dict[int, ProgressRecord] = field(default_factory=dict)
    growth: GrowthRecord | None = None
    """A two-phase growth of the job (being prepared, committed or abandoned), if any."""
    joiners: dict[tuple[str, int], JoinerRecord] = field(default_factory=dict)
    """(node, slot) -> what the workers started for a growth reported (READY, or an early exit)."""

    @property
    def active(self) -> bool:
        return self.status.phase not in TERMINAL_PHASES


@dataclass(kw_only=True)
class NodeSummary:
    id: str
    record: dict[str, Any]
    """The NodeRecord (live, or the last registered one from the registry) as a dict."""
    registered: bool
    state: str
    reason: str
    cordon: CordonRecord | None = None
    used_slots: int = 0
    used: frozenset[int] = frozenset()
    health: dict[str, Any] | None = None
    lost_at: float | None = None


Parser = Callable[[str], Any]
"""Turns a raw value into a record; raises ValueError on garbage."""
ParseFn = Callable[[str, str, Parser], Any]
"""(key, raw value, parser) -> record, or None when malformed (logged)."""


def _spec(raw: str) -> JobSpec:
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"spec is not valid JSON: {exc}") from exc
    return JobSpec.from_dict(data)


def build_job(job_id: str, raw: dict[str, str], parse: ParseFn, keys: Keys) -> JobView | None:
    """A job's view from its raw keys (rest-of-key -> value); None if spec or status is unusable."""
    if "spec" not in raw or "status" not in raw:
        return None  # half-written or being deleted
    spec = parse(keys.job_spec(job_id), raw["spec"], _spec)
    status = parse(keys.job_status(job_id), raw["status"], JobStatusRecord.from_json)
    if spec is None or status is None:
        return None
    job = JobView(id=job_id, spec=spec, status=status, cancelled="cancel" in raw)
    if "plan" in raw:
        job.plan = parse(keys.job_plan(job_id), raw["plan"], Plan.from_json)
    if "growth" in raw:
        job.growth = parse(keys.job_growth(job_id), raw["growth"], GrowthRecord.from_json)
    for rest, value in raw.items():
        kind, _, where = rest.partition("/")
        node, _, slot = where.partition("/")
        if kind == "joiners" and node and slot.isdigit():
            record = parse(keys.job_joiner(job_id, node, int(slot)), value, JoinerRecord.from_json)
            if record is not None:
                job.joiners[(node, int(slot))] = record
    for rest, value in raw.items():
        kind, _, rank_text = rest.partition("/")
        if kind not in ("workers", "progress") or not rank_text.isdigit():
            continue
        rank = int(rank_text)
        if kind == "workers":
            record = parse(keys.job_worker(job_id, rank), value, WorkerStatusRecord.from_json)
            if record is not None:
                job.workers[rank] = record
        else:
            record = parse(keys.job_progress_rank(job_id, rank), value, ProgressRecord.from_json)
            if record is not None:
                job.progress_ranks[rank] = record
    # ranks beyond the current world are left over from a larger generation: not progress any more
    world = job.plan.world_size if job.plan is not None else None
    job.progress = fold_progress(spec, {r: p for r, p in job.progress_ranks.items() if world is None or r < world})
    return job


def parse_uncached(report: Callable[[str, str], None]) -> ParseFn:
    """A ParseFn for values read straight from etcd (no memo)."""
    def parse(key: str, raw: str, parser: Parser) -> Any:
        try:
            return parser(raw)
        except ValueError as exc:
            report(key, str(exc))
            return None
    return parse


async def read_job(etcd: Etcd, keys: Keys, job_id: str, report: Callable[[str, str], None]) -> JobView | None:
    """One job straight from etcd (fresh on any replica, right after a submit); malformed
    values go to ``report(key, problem)`` and are skipped."""
    k = keys
    spec, status, plan, cancel, workers, progress = await asyncio.gather(
        etcd.get(k.job_spec(job_id)), etcd.get(k.job_status(job_id)),
        etcd.get(k.job_plan(job_id)), etcd.get(k.job_cancel(job_id)),
        etcd.get_prefix(k.job_workers(job_id)), etcd.get_prefix(k.job_progress(job_id)))
    raw: dict[str, str] = {}
    for name, kv in (("spec", spec), ("status", status), ("plan", plan), ("cancel", cancel)):
        if kv is not None:
            raw[name] = kv.value
    for kv in workers + progress:
        parsed = k.parse_job_key(kv.key)
        if parsed:
            raw[parsed[1]] = kv.value
    return build_job(job_id, raw, parse_uncached(report), k)


async def step_metrics(etcd: Etcd, keys: Keys, job_id: str, since_step: int) -> list[StepRecord]:
    """Per-step records from the metric batches; a step re-run after a recovery keeps the record
    of its newest generation (the last written of that generation: a survivor's re-sent record,
    agent/progress.py ``backfill``, may arrive after the re-run's)."""
    by_step: dict[int, StepRecord] = {}
    batches = await read_prefix_paged(etcd, keys.job_metrics(job_id), lambda key: True, page=200)
    for kv in sorted(batches, key=lambda kv: kv.mod_revision):
        try:
            batch = MetricsBatch.from_json(kv.value)
        except RecordError as exc:
            log.warning("skipping malformed metrics batch at %s: %s", kv.key, exc)
            continue
        for step in batch.steps:
            if step.step >= since_step and (step.step not in by_step
                                            or step.generation >= by_step[step.step].generation):
                by_step[step.step] = step
    return [by_step[s] for s in sorted(by_step)]


def jobs_from(cache: ClusterCache) -> dict[str, JobView]:
    grouped: dict[str, dict[str, str]] = {}
    for key, (value, _) in cache.data.items():
        parsed = cache.keys.parse_job_key(key)
        if parsed:
            grouped.setdefault(parsed[0], {})[parsed[1]] = value
    jobs = {}
    for job_id, raw in grouped.items():
        job = build_job(job_id, raw, cache.parse, cache.keys)
        if job:
            jobs[job_id] = job
    return jobs


def used_slots_by_node(jobs: dict[str, JobView]) -> dict[str, set[int]]:
    """Slots held by the current plans of active jobs, and by the new workers of a growth
    being prepared (they run already, outside the plan, until it switches)."""
    used: dict[str, set[int]] = {}
    for job in jobs.values():
        if job.active and job.plan:
            for w in job.plan.workers:
                used.setdefault(w.node, set()).add(w.slot)
        if job.active and job.growth is not None and job.growth.state == "PREPARING":
            for node, slot in job.growth.joiner_slots():
                used.setdefault(node, set()).add(slot)
    return used


def _node_dict(raw: str) -> dict[str, Any]:
    return NodeRecord.from_json(raw).to_dict()


def _health_dict(raw: str) -> dict[str, Any]:
    return NodeHealthRecord.from_json(raw).to_dict()


def _cordon(raw: str) -> CordonRecord:
    try:
        return CordonRecord.from_json(raw)
    except RecordError:
        return CordonRecord(time=0.0, reason="cordon")  # present means cordoned, whatever it holds


def nodes_from(cache: ClusterCache, jobs: dict[str, JobView], *, with_health: bool = False) -> dict[str, NodeSummary]:
    """Live nodes plus remembered (registry) ones; a remembered node without a lease is NOT_READY.

    Values are parsed once per revision (``cache.parse``), so this stays cheap at
    thousands of nodes; telemetry is parsed only when asked for (ListNodes).
    """
    keys = cache.keys
    used = used_slots_by_node(jobs)
    live: dict[str, dict[str, Any]] = {}
    for key, value in cache.prefixed(keys.nodes()).items():
        node_id = keys.parse_node_key(key)
        if node_id is not None:
            record = cache.parse(key, value, _node_dict)
            if record is not None:
                live[node_id] = record
    remembered: dict[str, RegistryRecord] = {}
    registry = keys.registry()
    for key, value in cache.prefixed(registry).items():
        record = cache.parse(key, value, RegistryRecord.from_json)
        if record is not None:
            remembered[key[len(registry):]] = record
    cordons: dict[str, CordonRecord] = {}
    for key, value in cache.prefixed(keys.cordons()).items():
        cordons[key[len(keys.cordons()):]] = cache.parse(key, value, _cordon)
    nodes = {}
    for node_id in sorted(set(live) | set(remembered)):
        cordon = cordons.get(node_id)
        registered = node_id in live
        state, reason = node_state(registered=registered, cordon_reason=cordon.reason if cordon else None)
        reg = remembered.get(node_id)
        record = live.get(node_id) or (reg.node if reg else {"id": node_id})
        health = None
        if with_health and registered:
            health_key = keys.node_health(node_id)
            health_raw = cache.get(health_key)
            if health_raw is not None:
                health = cache.parse(health_key, health_raw, _health_dict)
        if state == "READY" and record.get("condition_reason"):
            reason = str(record["condition_reason"])
        if not registered and reg is not None and reg.lost_at is not None:
            since = datetime.datetime.fromtimestamp(reg.lost_at, tz=datetime.timezone.utc)
            reason = f"agent lease expired at {since.isoformat(timespec='seconds')}"
        node_used = frozenset(used.get(node_id, ()))
        nodes[node_id] = NodeSummary(
            id=node_id, record=record, registered=registered, state=state, reason=reason, cordon=cordon,
            used_slots=len(node_used), used=node_used, health=health,
            lost_at=reg.lost_at if reg and not registered else None,
        )
    return nodes
