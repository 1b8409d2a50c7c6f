"""Progress relay: tail a worker's metrics JSONL file and publish it to etcd.

* per rank, the latest step summary at ``Keys.job_progress_rank`` — at most one
  write per ``min_interval_s`` (never one etcd write per step per rank);
* for the job's metrics rank (dp rank 0 on the last pipeline stage: the rank
  that computes the loss; rank 0 when pp=1), every step record, appended in
  batches to ``Keys.job_metrics_batch(job, first_step)`` (``protos.records.MetricsBatch``);
* the ``tenax_rank_*`` gauges;
* when a plan names this worker (``backfill``: the metrics rank was lost), its own recent
  step records, so the steps the lost rank finished after its last relay are not missing;
  and the lines a worker marks ``"replayed"`` (the step lines kept with the disk checkpoint it
  resumed from), under the same kind of key.

The worker writes one JSON object per line with at least ``step``, ``loss``,
``tokens`` and ``step_time`` (seconds); ``tokens_per_s``, ``collective_time`` and
``forward_time`` + ``backward_time`` (compute) are used when present. A malformed line is logged and skipped.

Generations (elastic recovery): the same process may hold another rank after a
re-plan. A step line names its ``generation`` (and ``rank``, ``dp_rank``,
``pp_rank``, ``layout``); it is published under the rank it had in that
generation, and it feeds the job's metrics if it was the metrics rank then.
The supervisor tells the relay each generation's role (``set_role``); lines of
a generation the agent has not seen yet wait for it (unless they carry their
role themselves). Recovery records (``protos.recovery``, ``"event": "recovery"``)
and the first step done at a new generation are published at once (not
throttled), inside the progress record: ``"recovery"`` (the latest record) and
``"generation_first_step"`` (``{generation, step, time}``); the controller
folds them into the job's recovery entry (controller/recovery.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from agent import flight, metrics
from agent.decisions import should_publish
from agent.retrylog import FailureLog
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from common.retry import Backoff, cancel_and_wait
from protos.keys import Keys
from protos.plan import is_metrics_rank
from protos.records import MetricsBatch, ProgressRecord, StepRecord
from protos.recovery import is_recovery_line

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the metrics file is read for new lines (seconds)."""
MAX_BATCH = 200
"""Step records per metrics batch key."""
RECENT_STEPS = 512
"""Step records every worker's relay keeps (newest per step), to re-send when the plan names it
(``backfill``): more than a relay interval's steps at any step time."""
MAX_WAITING_LINES = 10_000
"""Lines of a not-yet-seen generation kept until its role is known (then the oldest are dropped)."""
_PP_RE = re.compile(r"pp(\d+)")


def _first(record: dict[str, Any], *names: str) -> Any:
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return None


def _compute_seconds(record: dict[str, Any]) -> float | None:
    explicit = _first(record, "compute_s", "compute_time", "compute_time_s")
    if explicit is not None:
        return explicit
    parts = [record.get("forward_time"), record.get("backward_time")]
    if all(isinstance(p, (int, float)) for p in parts):
        return float(parts[0]) + float(parts[1])
    return None


def summarize(record: dict[str, Any], generation: int) -> dict[str, Any] | None:
    """One worker metrics line -> the progress/step record; None if it has no step."""
    step = _first(record, "step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return None
    step_time = _first(record, "step_time_s", "step_time")
    tokens_per_s = _first(record, "tokens_per_s")
    tokens = _first(record, "tokens")
    if tokens_per_s is None and tokens is not None and step_time:
        tokens_per_s = float(tokens) / float(step_time)
    loss = _first(record, "loss")
    eval_loss, eval_ppl = record.get("eval_loss"), record.get("eval_perplexity")
    return {
        "step": int(step),
        "loss": float(loss) if isinstance(loss, (int, float)) else None,
        "tokens_per_s": float(tokens_per_s) if tokens_per_s is not None else 0.0,
        "step_time_s": float(step_time) if step_time is not None else 0.0,
        "time": float(_first(record, "time") or time.time()),
        "generation": int(_first(record, "generation") or generation),
        "compute_s": _compute_seconds(record),
        "collective_s": _first(record, "collective_s", "collective_time", "collective_time_s", "comm_time"),
        "recoverable_step": int(_first(record, "recoverable_step") or 0),
        "eval_loss": float(eval_loss) if isinstance(eval_loss, (int, float)) else None,
        "eval_perplexity": float(eval_ppl) if isinstance(eval_ppl, (int, float)) else None,
    }


class ProgressRelay:
    def __init__(self, *, etcd: Etcd, keys: Keys, job: str, rank: int, path: Path, offset: int = 0,
                 generation: int = 1, min_interval_s: float = 1.0, relay_steps: bool = False,
                 on_first_record: Callable[[], None] | None = None) -> None:
        self.etcd = etcd
        self.keys = keys
        self.job = job
        self.rank = rank
        self.path = Path(path)
        self.offset = offset
        self.generation = generation
        self.min_interval_s = min_interval_s
        self.on_first_record = on_first_record
        self.relay_steps = relay_steps
        """True on the one rank per job whose step records go to the job's metrics."""
        self.roles: dict[int, tuple[int, bool]] = {generation: (rank, relay_steps)}
        """generation -> (rank, is the metrics rank) of this worker in that generation."""
        self._waiting: list[dict[str, Any]] = []
        self.recovery: dict[str, Any] | None = None
        """The worker's latest recovery record."""
        self.first_step: dict[str, Any] | None = None
        """{generation, step, time} of the first step this worker did at its newest generation."""
        self._urgent = False
        self.latest: dict[str, Any] | None = None
        self._latest_published: dict[str, Any] | None = None
        self._last_publish: float | None = None
        self._batch: list[StepRecord] = []
        self._recent: dict[int, StepRecord] = {}
        """step -> this worker's newest record of it (any role; insertion order: oldest first)."""
        self._backfill: list[tuple[int, list[StepRecord]]] = []
        """(generation that asked, records) waiting to be published."""
        self._backfilled: set[int] = set()
        self._partial = b""
        self._seen_any = False
        self._task: asyncio.Task | None = None
        self.writes = 0
        """etcd writes done (tests check the throttle)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"progress-{self.job}-{self.rank}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop tailing; read what is left in the file and publish it (best effort within the timeout)."""
        await cancel_and_wait(self._task)
        self._read_new_lines()
        try:
            await asyncio.wait_for(self._publish(force=True), timeout_s)
        except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
            log.warning("final progress of job %s rank %d not published: %r", self.job, self.rank, exc)

    async def _run(self) -> None:
        backoff = Backoff(0.2, 2.0)
        failures = FailureLog(log, f"progress of job {self.job} rank {self.rank}")
        while True:
            self._read_new_lines()
            try:
                await self._publish(force=False)
                failures.ok()
                backoff.reset()
                await asyncio.sleep(POLL_S)
            except EtcdUnavailable as exc:
                failures.failed(exc)
                await backoff.sleep()

    def _read_new_lines(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(4 * 1024 * 1024)
        except FileNotFoundError:
            return
        if not data:
            return
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        for line in lines:
            if line.strip():
                self._ingest(line)

    def set_role(self, generation: int, rank: int, relay_steps: bool) -> None:
        """This worker's rank (and whether it is the metrics rank) in ``generation``."""
        self.roles[generation] = (rank, relay_steps)
        if generation >= self.generation:
            self.generation, self.rank, self.relay_steps = generation, rank, relay_steps
        waiting, self._waiting = self._waiting, []
        for raw in waiting:
            self._handle(raw)

    def backfill(self, generation: int) -> int:
        """Re-send this worker's recent step records of generations before ``generation`` to the
        job's metrics (once per generation); returns how many. Every rank's record carries the
        same all-reduced loss, so they stand in for those of a metrics rank that was lost
        before its agent relayed them (controller.replan.metrics_backfill)."""
        self._read_new_lines()
        if generation in self._backfilled:
            return 0
        self._backfilled.add(generation)
        records = sorted((r for r in self._recent.values() if r.generation < generation), key=lambda r: r.step)
        if records:
            self._backfill.append((generation, records))
            self._urgent = True
        return len(records)

    def _replayed(self, raw: dict[str, Any]) -> None:
        """A step line the worker re-wrote from a disk checkpoint (trainer/elastic.py): a step of
        an older generation, for the job's metrics only (its role and progress are history)."""
        rec = summarize(raw, self.generation)
        if rec is None or rec["loss"] is None:
            return
        step = StepRecord(step=rec["step"], loss=rec["loss"], generation=rec["generation"], time=rec["time"],
                          step_time_s=rec["step_time_s"], tokens_per_s=rec["tokens_per_s"],
                          eval_loss=rec["eval_loss"], eval_perplexity=rec["eval_perplexity"])
        if self._backfill and self._backfill[-1][0] == self.generation:
            self._backfill[-1][1].append(step)
        else:
            self._backfill.append((self.generation, [step]))

    def _role(self, generation: int, raw: dict[str, Any]) -> tuple[int, bool] | None:
        """(rank, metrics rank?) for a line of ``generation``; None: wait for the agent to see that plan."""
        if generation in self.roles:
            return self.roles[generation]
        rank, dp_rank, pp_rank = raw.get("rank"), raw.get("dp_rank"), raw.get("pp_rank")
        pp = _PP_RE.search(str(raw.get("layout", "")))
        if all(isinstance(x, int) for x in (rank, dp_rank, pp_rank)) and pp:
            return rank, is_metrics_rank(dp_rank, pp_rank, int(pp.group(1)))  # the line says it itself
        if generation > max(self.roles):
            return None
        older = [g for g in self.roles if g <= generation]
        return self.roles[max(older) if older else min(self.roles)]

    def _ingest(self, line: bytes) -> None:
        try:
            raw = json.loads(line)
        except ValueError:
            log.warning("job %s rank %d: malformed metrics line skipped: %r", self.job, self.rank, line[:200])
            return
        if isinstance(raw, dict):
            self._handle(raw)

    def _wait_for_role(self, raw: dict[str, Any]) -> None:
        self._waiting.append(raw)
        if len(self._waiting) > MAX_WAITING_LINES:
            del self._waiting[0]

    def _handle(self, raw: dict[str, Any]) -> None:
        if is_recovery_line(raw):
            generation = int(raw.get("new_generation") or 0)
            if generation > max(self.roles) and not isinstance(raw.get("rank"), int):
                self._wait_for_role(raw)
                return
            self.recovery = raw
            self._urgent = True
            return
        if "event" in raw:
            return  # other worker events (e.g. step_error) name a step but are no step done
        if raw.get("replayed"):
            self._replayed(raw)
            return
        rec = summarize(raw, self.generation)
        if rec is None:
            return
        role = self._role(rec["generation"], raw)
        if role is None:
            self._wait_for_role(raw)
            return
        rank, relay_steps = role
        rec["rank"] = rank
        if self.first_step is None or rec["generation"] > self.first_step["generation"]:
            self.first_step = {"generation": rec["generation"], "step": rec["step"], "time": rec["time"]}
            self._urgent = True  # the controller ends a recovery on it
        self.latest = rec
        labels = (self.job, str(rank))
        metrics.RANK_STEP.labels(*labels).set(rec["step"])
        metrics.RANK_STEP_SECONDS.labels(*labels).set(rec["step_time_s"])
        if isinstance(rec["compute_s"], (int, float)):
            metrics.RANK_COMPUTE_SECONDS.labels(*labels).set(rec["compute_s"])
        if isinstance(rec["collective_s"], (int, float)):
            metrics.RANK_COLLECTIVE_SECONDS.labels(*labels).set(rec["collective_s"])
        flight.export_comm(self.job, rank, raw.get("comm"))  # per-kind communication times (issue #20)
        if rec["loss"] is not None:
            step = StepRecord(step=rec["step"], loss=rec["loss"], generation=rec["generation"],
                              time=rec["time"], step_time_s=rec["step_time_s"],
                              tokens_per_s=rec["tokens_per_s"], eval_loss=rec["eval_loss"],
                              eval_perplexity=rec["eval_perplexity"])
            if relay_steps:
                self._batch.append(step)
            self._recent.pop(step.step, None)
            self._recent[step.step] = step
            if len(self._recent) > RECENT_STEPS:
                del self._recent[next(iter(self._recent))]
        if not self._seen_any:
            self._seen_any = True
            if self.on_first_record:
                self.on_first_record()

    async def _publish(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and not self._urgent and not should_publish(self._last_publish, now, self.min_interval_s):
            return
        wrote = False
        newest = max(self.roles)
        stale = self.latest is not None and self.latest["generation"] < newest and \
            self.latest["rank"] != self.roles[newest][0]
        if stale:
            # a step of the old generation under the old rank: that key may belong to another
            # worker of the new generation now; this worker's next step publishes its new rank
            self._latest_published = self.latest
        if self.latest is not None and self.latest is not self._latest_published:
            latest = self.latest
            progress = ProgressRecord(step=latest["step"], time=latest["time"], loss=latest["loss"],
                                      tokens_per_s=latest["tokens_per_s"], generation=latest["generation"],
                                      step_time_s=latest["step_time_s"],
                                      recoverable_step=latest["recoverable_step"]).to_dict()
            # extra keys (readers ignore what they do not know): the straggler inputs
            progress["compute_s"] = latest["compute_s"]
            progress["collective_s"] = latest["collective_s"]
            if self.recovery is not None:
                progress["recovery"] = self.recovery
            if self.first_step is not None:
                progress["generation_first_step"] = self.first_step
            self._urgent = False
            try:
                await self.etcd.put(self.keys.job_progress_rank(self.job, latest["rank"]), json.dumps(progress))
                self.writes += 1
                wrote = True
            except EtcdError as exc:  # not retried: the next step is published anew
                log.error("job %s rank %d: progress of step %d skipped, etcd refused it: %s", self.job,
                          latest["rank"], latest["step"], exc)
            self._latest_published = self.latest
        while self._batch:
            chunk = self._batch[:MAX_BATCH]
            try:
                await self.etcd.put(self.keys.job_metrics_batch(self.job, chunk[0].step),
                                    MetricsBatch(steps=tuple(chunk)).to_json())
                self.writes += 1
                wrote = True
            except EtcdError as exc:  # not retried: the steps are lost to the metrics history only
                log.error("job %s rank %d: metrics of steps %d-%d skipped, etcd refused them: %s", self.job,
                          self.rank, chunk[0].step, chunk[-1].step, exc)
            del self._batch[:len(chunk)]
        while self._backfill:
            generation, records = self._backfill[0]
            for i in range(0, len(records), MAX_BATCH):
                chunk = records[i:i + MAX_BATCH]
                try:
                    await self.etcd.put(self.keys.job_metrics_backfill(self.job, chunk[0].step, generation),
                                        MetricsBatch(steps=tuple(chunk)).to_json())
                    self.writes += 1
                    wrote = True
                except EtcdError as exc:  # not retried, like the batches above
                    log.error("job %s: re-sent metrics of steps %d-%d skipped, etcd refused them: %s", self.job,
                              chunk[0].step, chunk[-1].step, exc)
            del self._backfill[0]
        if wrote:
            self._last_publish = now
