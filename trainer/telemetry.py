"""Per-rank step telemetry: what the hang and straggler detection read.

The trainer already times its phases with the wall clock (forward, backward,
pipeline wait, collectives, optimizer) and writes one JSON line per step to
``TENAX_METRICS_FILE``; the agent tails that file (agent/progress.py,
agent/rank_health.py), so it is the worker -> agent channel and costs one
``write()`` per step. This module adds what detection needs on top:

* ``data_time``: building this rank's batch.
* ``compute_time``: forward + backward, the straggler statistic's input. On
  CUDA the wall clock only measures kernel launches, so compute is measured
  with CUDA events instead, read LAZILY: the events of step s are read at the
  start of step s+1, and only if ``query()`` says they completed (the step's
  loss ``.item()`` has synchronised by then anyway), so telemetry never adds a
  device sync to the hot path. Such a line reports ``compute_time`` of the
  previous step and says so in ``compute_time_step``.
* a heartbeat line ``{"heartbeat": unix time, "phase": ..., "step_in_progress": s}``
  about once a second from one daemon thread per process while a step runs: a
  rank blocked in a collective keeps beating (alive, waiting), a frozen process
  (SIGSTOP) stops.
* ``{"event": "step_error", ...}`` when a step raises (a collective failing on a
  dead peer, an abort, an NCCL async error surfacing in ``wait``).
* the chaos slowdown: ``<TENAX_RUN_DIR>/chaos-rank-<rank>.json`` {"slow_factor": f}
  (written by the agent for ``tenax chaos slow``) stretches compute by ``f``.
  It is checked with one ``os.stat`` per step and read only when it changed.

``TENAX_TELEMETRY=0`` turns all of it off (the benchmark's baseline).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from trainer.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TelemetrySettings:
    enabled: bool = True
    """Off: no extra fields, no heartbeat, no slowdown (TENAX_TELEMETRY=0)."""
    heartbeat_s: float = 1.0
    """Seconds between heartbeat lines while a step runs (> 0)."""
    control_dir: str = ""
    """Directory of the chaos control file (the worker's TENAX_RUN_DIR); '' = no chaos."""

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s: must be > 0 seconds, got {self.heartbeat_s}")

    @classmethod
    def from_worker(cls, worker: WorkerSettings) -> "TelemetrySettings":
        return cls(enabled=worker.telemetry, heartbeat_s=worker.heartbeat_s, control_dir=worker.run_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TelemetrySettings":
        """From the launch environment (``TENAX_TELEMETRY``, ``TENAX_HEARTBEAT_S``, ``TENAX_RUN_DIR``)."""
        return cls.from_worker(WorkerSettings.from_env(env))


class SlowdownControl:
    """The chaos slowdown factor of one rank, re-read only when its file changes."""

    def __init__(self, directory: str, rank: int) -> None:
        self.path = Path(directory) / f"chaos-rank-{rank}.json" if directory else None
        self._stamp: tuple[int, int] | None = None
        self.factor = 1.0

    def current(self) -> float:
        if self.path is None:
            return 1.0
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self.factor = None, 1.0
            return 1.0
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                value = float(json.loads(self.path.read_text()).get("slow_factor", 1.0))
            except (OSError, ValueError, AttributeError, TypeError):
                value = 1.0
            self.factor = value if 1.0 <= value <= 100.0 else 1.0
        return self.factor


class _CudaSpan:
    """Start/end CUDA events of one step's compute; read later, never waited for."""

    def __init__(self, step: int) -> None:
        import torch  # CUDA only: readers of metrics files import this module without torch

        self.step = step
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.start.record()
        self.ended = False

    def close(self) -> None:
        self.end.record()
        self.ended = True

    def seconds_if_done(self) -> float | None:
        if not self.ended or not self.end.query():
            return None
        return self.start.elapsed_time(self.end) / 1000.0


class StepTelemetry:
    """One rank's step telemetry. ``write`` appends one JSON line (the trainer's MetricsWriter)."""

    def __init__(self, *, device_type: str, rank: int, write: Callable[[dict], None],
                 settings: TelemetrySettings | None = None) -> None:
        self.settings = settings or TelemetrySettings.from_env()
        self.device_type = device_type
        self.rank = rank
        self._write = write
        self.slowdown = SlowdownControl(self.settings.control_dir, rank)
        self.phase = "starting"
        """What the rank does now (read by the heartbeat thread; a plain attribute write)."""
        self.step_in_progress: int | None = None
        self._cuda_span: _CudaSpan | None = None
        self._cuda_pending: _CudaSpan | None = None
        self._data_start = 0.0
        self.data_time = 0.0
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ------------------------------------------------------------ the step
    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around one train step: phase bookkeeping, CUDA span, error events."""
        if not self.enabled:
            yield
            return
        self.step_in_progress = step
        self.phase = "data"
        _Heartbeat.follow(self)
        if self.device_type == "cuda":
            self._cuda_pending, self._cuda_span = self._cuda_span, None  # the new span starts with compute
        try:
            yield
        except BaseException as exc:
            self.event("step_error", step=step, phase=self.phase, error=f"{type(exc).__name__}: {exc}"[:500],
                       collective=self.phase == "collective" or "Comm" in type(exc).__name__)
            raise
        finally:
            self.step_in_progress = None
            self.phase = "between steps"

    def mark(self, phase: str) -> None:
        """Enter a phase (compute, collective, optimizer); closes the CUDA compute span after compute."""
        if not self.enabled:
            return
        if self.phase == "compute" and phase != "compute" and self._cuda_span is not None:
            self._cuda_span.close()
        self.phase = phase

    def data_started(self) -> None:
        if self.enabled:
            self._data_start = time.perf_counter()

    def data_done(self) -> None:
        if self.enabled:
            self.data_time = time.perf_counter() - self._data_start
            self.phase = "compute"
            if self.device_type == "cuda" and self.step_in_progress is not None:
                # from here, not from the step's start: the GPU idles while the CPU builds the batch
                self._cuda_span = _CudaSpan(self.step_in_progress)

    def apply_slowdown(self, compute_s: float) -> float:
        """Chaos slow: sleep (factor - 1) x compute; returns the seconds added."""
        if not self.enabled:
            return 0.0
        factor = self.slowdown.current()
        if factor <= 1.0:
            return 0.0
        base = compute_s
        if self.device_type == "cuda" and self._cuda_pending is not None:
            base = self._cuda_pending.seconds_if_done() or compute_s  # launch time alone says nothing on CUDA
        extra = (factor - 1.0) * base
        time.sleep(extra)
        return extra

    def fields(self, *, forward_s: float, backward_s: float) -> dict[str, Any]:
        """Extra fields of this step's metrics line."""
        if not self.enabled:
            return {}
        out: dict[str, Any] = {"data_time": self.data_time, "compute_time": forward_s + backward_s,
                               "slow_factor": self.slowdown.factor}
        if self.device_type == "cuda":
            previous = self._cuda_pending.seconds_if_done() if self._cuda_pending is not None else None
            if previous is not None:
                out["compute_time"] = previous
                out["compute_time_step"] = self._cuda_pending.step + 1  # steps count from 1 in the lines
            else:
                out.pop("compute_time")  # launch time is not compute time; the agent falls back to fwd+bwd
        return out

    # ------------------------------------------------------------ events
    def event(self, kind: str, **fields: Any) -> None:
        try:
            self._write({"event": kind, "rank": self.rank, "time": time.time(), **fields})
        except OSError as exc:
            log.warning("telemetry event %s not written: %r", kind, exc)

    def beat(self) -> None:
        """One heartbeat line, if a step is running (between steps the step lines are the heartbeat)."""
        step = self.step_in_progress
        if step is None or self._closed:
            return
        self._write({"heartbeat": time.time(), "phase": self.phase, "step_in_progress": step, "rank": self.rank})

    def close(self) -> None:
        self._closed = True


class _Heartbeat:
    """One daemon thread per process beats for the telemetry whose step started last: an elastic
    worker builds a new Trainer (and telemetry) per plan generation, and must not gain a thread
    each time."""

    _lock = threading.Lock()
    _thread: threading.Thread | None = None
    _current: StepTelemetry | None = None

    @classmethod
    def follow(cls, telemetry: StepTelemetry) -> None:
        cls._current = telemetry  # a plain reference swap: the hot path takes no lock
        if cls._thread is None:
            with cls._lock:
                if cls._thread is None:
                    cls._thread = threading.Thread(target=cls._run, name="tenax-heartbeat", daemon=True)
                    cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            current = cls._current
            time.sleep(current.settings.heartbeat_s if current is not None else 1.0)
            current = cls._current
            if current is None:
                continue
            try:
                current.beat()
            except (OSError, ValueError) as exc:  # the metrics file is closed: the worker is ending
                log.debug("heartbeat not written: %r", exc)


def read_step_records(path) -> list[dict]:
    """The per-step lines of a metrics file, skipping heartbeats and events.

    A metrics file mixes step lines (they have ``step`` and ``loss``) with
    heartbeat lines, ``step_error`` events and recovery records; readers that
    want the training curve use this instead of parsing every line.
    """
    records = []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if "step" in record and "loss" in record:
            records.append(record)
    return records
