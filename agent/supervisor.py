"""Worker supervision: start, watch, stop and report the workers of this node.

Worker state machine (the value of ``Keys.job_worker(job, rank)``)::

                 spawn                first metrics line
    (plan) ──> STARTING ──────────────> RUNNING
                  │                        │
                  │  exit 0                │ exit 0             -> EXITED
                  ├────────────────────────┤ exit != 0 / signal -> FAILED   (exit_code, signal)
                  │                        │ we killed it       -> KILLED   (cancel, not in plan,
                  ▼                        ▼                                 agent shutdown)

* STARTING is written with the pid right after the process exists; RUNNING when
  the worker wrote its first per-step metrics line (it is really training).
* Every exit is seen at once: ``await proc.wait()`` on an asyncio subprocess
  (the child watcher blocks in ``waitpid``; no polling), and reported before
  anything else happens for that worker (``tenax_agent_exit_report_seconds``).
* A worker runs in its own process group (``start_new_session``) with
  ``PR_SET_PDEATHSIG=SIGKILL`` (set by an exec shim, see ``with_parent_death_signal``):
  if the agent dies, even by SIGKILL, the kernel kills its workers. Stopping a worker is SIGTERM to its group, then SIGKILL to
  the group after ``kill_grace_s``.
* A worker that exited is not started again for the same plan generation: the
  controller decides about it with a new generation (``decisions.plan_actions``).

Generations (elastic recovery). A worker is identified by its slot on this node:
on plan g+1 a live worker whose slot the plan names is *adopted* (same process,
maybe a new rank: ``workers`` is re-keyed and its status is written under the
new rank); a new worker is started on an assigned slot with no live worker; a
live worker the plan does not name is *retired*: it reads the plan, hands its
state over at the switch step and exits by itself; the agent stops it only if
it is still alive ``retire_grace_s`` later. A retired worker no longer writes
status keys (its old rank key may belong to another worker now).

Two-phase growth (``apply_growth``): for a growth being PREPARED the agent starts
a worker on each of its joiner slots, launched with the tentative plan g+1 and
``TENAX_GROWTH_ID``. Such a worker is *preparing*: it runs outside every plan, so
it writes no status under a rank key (that rank may still belong to a worker of
plan g); it says READY in its ready file once prepared, which the agent relays to
Keys.job_joiner, and its agent writes an exit there if it ends first.

Workers never talk to etcd and get no etcd credentials: the agent relays every newer plan
of a job to the job's plan file (``relay_plan``, first thing when a plan arrives), which
the workers poll, and their READY records to etcd. When plan g+1 is written (the growth
committed) it is adopted like a survivor; when the growth is abandoned (or
replaced) it is stopped. A preparing worker that exited never blocks a later start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import psutil

from agent import flight, metrics
from agent.data_roots import spec_with_checked_data_path
from agent.decisions import (Adopt, LocalWorker, Retire, Start, Stop, exit_state, growth_actions, memory_limit_bytes,
                             memory_verdict, plan_actions)
from agent.lifeline import open_lifeline
from agent.progress import ProgressRelay
from agent.slots import visible_devices
from common import events
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from common.files import write_atomic
from common.procexit import dying_returncode
from common.retry import Backoff
from protos import launch
from protos.keys import Keys
from protos.plan import Plan, WorkerAssignment, is_metrics_rank
from protos.records import GrowthRecord, JoinerRecord, WorkerStatusRecord, parse_or_none

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
READY_POLL_S = 0.02
"""Seconds between two looks for a preparing worker's ready file."""
MEMORY_POLL_S = 0.25
"""Seconds between two looks at the workers' resident memory (a worker allocating fast may
pass its limit by what it allocates in that time)."""


# The parent-death signal is set by a tiny exec shim, not by a preexec_fn: running
# Python code between fork and exec in the agent (which has gRPC and torch threads)
# runs their at-fork handlers in the child, and that crashed workers with SIGSEGV.
# The shim asks for SIGKILL on parent death, checks the agent did not die before
# that took effect, then execs the worker (same pid, the setting survives exec).
_PDEATHSIG_SHIM = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n    os._exit(1)\n"
    "try:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    print(f'tenax: cannot run worker command {sys.argv[2]!r}: {exc}', file=sys.stderr, flush=True)\n"
    "    os._exit(127)\n"
)


def with_parent_death_signal(command: list[str], parent_pid: int) -> list[str]:
    """``command`` wrapped so that the kernel SIGKILLs it when ``parent_pid`` dies."""
    return [sys.executable, "-c", _PDEATHSIG_SHIM, str(parent_pid), *command]


def default_worker_command() -> list[str]:
    return [sys.executable, "-m", "trainer.worker"]


@dataclass
class Worker:
    job: str
    rank: int
    slot: int
    generation: int
    pid: int
    proc: asyncio.subprocess.Process | None
    log_path: Path
    metrics_path: Path
    started: float
    state: str = "STARTING"
    exit_code: int | None = None
    signal: str = ""
    stop_reason: str = ""
    """Set when the agent asked it to stop (then its exit is KILLED)."""
    exited_at: float | None = None
    """time.monotonic() when the exit was observed."""
    relay: ProgressRelay | None = None
    exit_reported: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the exit is written to etcd."""
    retired: bool = False
    """Not in the job's current plan any more (see the module docstring)."""
    preparing: str = ""
    """The growth id while the worker waits for its growth to be committed (module docstring)."""
    cause: str = ""
    """Why the agent killed it when something was wrong before the kill (a hang: see agent/chaos.py)."""
    last_error: str = ""
    """After a failure: the last exception line of its log."""
    log_start: int = 0
    """Offset in ``log_path`` where this process's output starts."""
    metrics_offset: int | None = None
    """Offset in ``metrics_path`` where this process's lines start (None: unknown)."""
    ranks: dict[int, int] = field(default_factory=dict)
    """Plan generation -> the rank it held in it (its log index: ``tenax logs --rank R --generation G``)."""
    lifeline: int | None = None
    """Read end of the worker's lifeline pipe (agent.lifeline): EOF when its exit begins."""
    reaped: asyncio.Future | None = None
    """Resolves once the process is reaped (after its teardown; agent.lifeline)."""
    memory_limit: int | None = None
    """Host memory (bytes of resident set, its process tree) it may use; None: no limit."""
    permanent: bool = False
    """Killed for a cause that would repeat on any slot (the memory limit): the job fails."""
    _report_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return self.exited_at is None

    def view(self) -> LocalWorker:
        return LocalWorker(job=self.job, rank=self.rank, slot=self.slot, generation=self.generation,
                           alive=self.alive, retired=self.retired, preparing=self.preparing)


class Supervisor:
    """Runs the workers that plans put on this node."""

    def __init__(self, *, etcd: Etcd, keys: Keys, node_id: str, work_dir: Path,
                 worker_command: list[str] | None = None, kill_grace_s: float = 5.0,
                 progress_interval_s: float = 1.0, extra_env: dict[str, str] | None = None,
                 retire_grace_s: float = 30.0, slot_devices: list[str] | None = None,
                 data_roots: Sequence[Path] = (), memory_limit_gb: float = 0.0,
                 checkpoint_dir: Path | None = None) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.work_dir = Path(work_dir)
        self.worker_command = worker_command or default_worker_command()
        self.kill_grace_s = kill_grace_s
        self.progress_interval_s = progress_interval_s
        self.extra_env = dict(extra_env or {})
        self.slot_devices = list(slot_devices) if slot_devices is not None else []
        """Slot i -> CUDA_VISIBLE_DEVICES of its workers (agent/slots.py); [] = slot i is GPU i."""
        self.data_roots = tuple(Path(r) for r in data_roots)
        """The only directories a job's data.path may name (agent/data_roots.py)."""
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        """The agent's ``--checkpoint-dir`` (jobs' disk checkpoints in ``<dir>/<job>``); None: each run dir."""
        self.memory_limit_gb = memory_limit_gb
        """The agent's ``--worker-memory-limit-gb`` (0: none); a job's own limit may be smaller."""
        self.workers: dict[tuple[str, int], Worker] = {}
        """(job, rank in the worker's current generation) -> worker."""
        self.retired: dict[tuple[str, int], Worker] = {}
        """(job, slot) -> a worker the current plan no longer names (it exits by itself)."""
        self.preparing: dict[tuple[str, int], Worker] = {}
        """(job, slot) -> a worker started for a growth that is not committed yet (it may have exited)."""
        self._growths: dict[str, tuple[GrowthRecord | None, int | None, dict[str, Any] | None]] = {}
        """job -> the latest growth applied (with the plan generation and spec it was applied with)."""
        self.retire_grace_s = retire_grace_s
        self._plans: dict[str, tuple[Plan, dict[str, Any] | None]] = {}
        """job -> the latest plan applied (and its spec), to apply again when a retired worker is gone."""
        self._reaping: dict[int, asyncio.Future] = {}
        """slot -> the reaping of the latest worker started there (``_wait_slot_reaped``)."""
        self.reap_wait_s = 60.0
        """How long a new worker waits for the slot's previous worker to be reaped (seconds)."""
        self._history: list[LocalWorker] = []
        """Workers that ran before (exited, or reported by an earlier life of this agent)."""
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.last_exit_report_s: float | None = None
        self._relayed: dict[str, int] = {}
        """job -> the plan generation last written to its plan file."""

    # ---------------------------------------------------------------- plans
    def local_views(self) -> list[LocalWorker]:
        return self._history + [w.view() for w in self.all_workers()]

    def all_workers(self) -> list[Worker]:
        return list(self.workers.values()) + list(self.retired.values()) + list(self.preparing.values())

    def remember(self, view: LocalWorker) -> None:
        """Record a worker that ran for a generation (so it is not started again)."""
        self._history.append(view)

    def relay_plan(self, plan: Plan) -> None:
        """Write ``plan`` (read from etcd) to the job's plan file if it is newer than the one
        there: the workers follow that file (they have no etcd access). Synchronous and fast
        (a small file renamed into place): call it first, before anything that waits."""
        if plan.generation <= self._relayed.get(plan.job_id, 0):
            return
        job_dir = self._job_dir(plan.job_id)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            job_dir.chmod(0o700)
            write_atomic(self.plan_file(plan.job_id), plan.to_json())
        except OSError as exc:  # the workers then wait for the plan in vain: their plan wait ends them
            log.error("job %s: plan generation %d not relayed to the workers: %r", plan.job_id, plan.generation,
                      exc)
            return
        self._relayed[plan.job_id] = plan.generation

    def plan_file(self, job: str) -> Path:
        """The job's plan file on this host (``TENAX_PLAN_FILE`` of its workers)."""
        return self._job_dir(job) / "plan.json"

    async def apply_plan(self, plan: Plan, *, cancelled: bool = False, spec: dict[str, Any] | None = None) -> list:
        self.relay_plan(plan)
        async with self._lock:
            if cancelled:
                self._plans.pop(plan.job_id, None)
            elif plan.generation >= self._plans.get(plan.job_id, (plan, None))[0].generation:
                self._plans[plan.job_id] = (plan, spec)
            actions = plan_actions(self.node_id, self.local_views(), plan, cancelled=cancelled)
            for action in actions:
                log.info("job %s: %s", plan.job_id, action)
            # Stops first, and waited for: a rank that moves to another slot (or a new worker
            # on a freed slot) must not start while the old process still holds it.
            stops = [self._stop_worker(w, a.reason) for a in actions if isinstance(a, Stop)
                     for w in self.all_workers() if w.job == a.job and w.slot == a.slot and w.alive]
            if stops:
                await asyncio.gather(*stops)
            for action in actions:
                if isinstance(action, Retire):
                    self._retire(action)
            self._adopt(plan, [a for a in actions if isinstance(a, Adopt)])
            self._backfill_metrics(plan)
            for action in actions:
                if isinstance(action, Start):
                    try:
                        await self._start(plan, action.assignment, spec)
                    except OSError as exc:  # cannot exec or cannot write the launch files
                        await self._report_start_failure(plan, action.assignment, exc)
            self._export_counts()
            return actions

    async def apply_growth(self, job: str, growth: GrowthRecord | None, *, plan_generation: int | None,
                           spec: dict[str, Any] | None = None, cancelled: bool = False) -> list:
        """Start the workers of a growth being prepared, or stop those of one that will never switch."""
        async with self._lock:
            self._growths[job] = (growth, plan_generation, spec)
            actions = growth_actions(self.node_id, self.local_views(), growth, job=job,
                                     plan_generation=plan_generation, cancelled=cancelled)
            for action in actions:
                log.info("job %s: %s", job, action)
            stops = [self._stop_worker(w, a.reason) for a in actions if isinstance(a, Stop)
                     for w in list(self.preparing.values()) if w.job == a.job and w.slot == a.slot and w.alive]
            if stops:
                await asyncio.gather(*stops)
            for action in actions:
                if isinstance(action, Start) and growth is not None:
                    tentative = Plan.from_dict(growth.plan)
                    try:
                        await self._start(tentative, action.assignment, spec, growth_id=action.growth_id)
                    except OSError as exc:
                        await self._report_start_failure(tentative, action.assignment, exc,
                                                         growth_id=action.growth_id)
            self._export_counts()
            return actions

    def _live_on_slot(self, job: str, slot: int, *, retired: bool = False) -> Worker | None:
        for w in self.all_workers():
            if w.job == job and w.slot == slot and w.alive and w.retired == retired:
                return w
        return None

    def _adopt(self, plan: Plan, adopts: list[Adopt]) -> None:
        """Survivors take their rank in the new generation: re-key them all at once (ranks
        may be swapped between them), then publish their status under the new rank."""
        moving = []
        for action in adopts:
            worker = self._live_on_slot(action.job, action.slot)
            if worker is None:
                continue
            if self.workers.get((worker.job, worker.rank)) is worker:
                del self.workers[(worker.job, worker.rank)]
            self.retired.pop((worker.job, worker.slot), None)
            if self.preparing.get((worker.job, worker.slot)) is worker:
                del self.preparing[(worker.job, worker.slot)]
            moving.append((worker, action))
        for worker, action in moving:
            old = self.workers.get((worker.job, action.rank))
            if old is not None and old is not worker:
                self._history.append(old.view())  # an exited worker that held this rank before
            a = plan.worker(action.rank)
            worker.rank, worker.generation, worker.retired = action.rank, action.generation, False
            worker.preparing = ""  # its growth was committed: from now on a worker of the plan
            worker.ranks[action.generation] = action.rank
            self._write_log_index(worker)
            self.workers[(worker.job, worker.rank)] = worker
            if worker.relay:
                worker.relay.set_role(action.generation, action.rank, _is_metrics_rank(plan, a))
            self._spawn(self._report(worker))

    def _backfill_metrics(self, plan: Plan) -> None:
        """The plan names a survivor here to re-send its recent step records (the metrics rank
        was lost with steps its agent had not relayed: controller.replan.metrics_backfill)."""
        backfill = plan.extra.get("metrics_backfill")
        if not isinstance(backfill, dict) or backfill.get("node") != self.node_id:
            return
        worker = self._live_on_slot(plan.job_id, int(backfill.get("slot", -1)))
        if worker is None:
            worker = self._live_on_slot(plan.job_id, int(backfill.get("slot", -1)), retired=True)
        if worker is not None and worker.relay is not None:
            sent = worker.relay.backfill(plan.generation)
            log.info("job %s: generation %d: %d recent step records of slot %d re-sent to the metrics "
                     "(the metrics rank was lost)", plan.job_id, plan.generation, sent, worker.slot)

    def _retire(self, action: Retire) -> None:
        worker = self._live_on_slot(action.job, action.slot)
        if worker is None or worker.retired:
            return
        if self.workers.get((worker.job, worker.rank)) is worker:
            del self.workers[(worker.job, worker.rank)]
        if self.preparing.get((worker.job, worker.slot)) is worker:
            del self.preparing[(worker.job, worker.slot)]  # a newer plan left its growth behind
        worker.retired, worker.preparing = True, ""
        self.retired[(worker.job, worker.slot)] = worker
        log.info("job %s: rank %d on slot %d retired (%s); stopped in %.0f s unless it exits", worker.job,
                 worker.rank, worker.slot, action.reason, self.retire_grace_s)
        self._spawn(self._stop_when_overdue(worker, action.reason))

    async def _stop_when_overdue(self, worker: Worker, reason: str) -> None:
        if worker.proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(worker.proc.wait()), self.retire_grace_s)
        except asyncio.TimeoutError:
            if worker.retired and worker.alive:
                log.warning("job %s: retired worker on slot %d still alive after %.0f s: stopping it",
                            worker.job, worker.slot, self.retire_grace_s)
                await self._stop_worker(worker, reason)
        await worker.exit_reported.wait()
        # its slot may be assigned in the latest plan or growth (a start that had to wait for it)
        latest = self._plans.get(worker.job)
        if latest is not None:
            await self.apply_plan(latest[0], spec=latest[1])
        growth = self._growths.get(worker.job)
        if growth is not None and growth[0] is not None:
            await self.apply_growth(worker.job, growth[0], plan_generation=growth[1], spec=growth[2])

    async def cancel_job(self, job: str, reason: str = "cancelled") -> None:
        self._plans.pop(job, None)  # nothing of this job is (re)started after this
        self._growths.pop(job, None)
        stops = [self._stop_worker(w, reason) for w in self.all_workers() if w.job == job and w.alive]
        if stops:
            await asyncio.gather(*stops)

    def forget_job(self, job: str) -> None:
        """Drop what we remember of a finished job (its exited workers, history, gauge series)."""
        for key, w in list(self.workers.items()):
            if key[0] == job and not w.alive:
                del self.workers[key]
                for gauge in (metrics.RANK_STEP, metrics.RANK_STEP_SECONDS, metrics.RANK_COMPUTE_SECONDS,
                              metrics.RANK_COLLECTIVE_SECONDS):
                    try:
                        gauge.remove(job, str(w.rank))
                    except KeyError:
                        pass
                flight.forget_comm(job, w.rank)
        for table in (self.retired, self.preparing):
            for key, w in list(table.items()):
                if key[0] == job and not w.alive:
                    del table[key]
        self._plans.pop(job, None)
        self._growths.pop(job, None)
        self._relayed.pop(job, None)
        self._history = [h for h in self._history if h.job != job]

    # ---------------------------------------------------------------- start
    def _job_dir(self, job: str) -> Path:
        return self.work_dir / "jobs" / job

    def log_path(self, job: str, rank: int) -> Path:
        """The log of the worker that holds ``rank`` now (a survivor keeps the file it started with)."""
        worker = self.workers.get((job, rank))
        return worker.log_path if worker is not None else self._job_dir(job) / f"rank-{rank}.log"

    # ---------------------------------------------------------------- log index
    # Every worker process has one log file (named by the rank and generation it started with)
    # and, next to it, ``<log>.json``: this node, its slot, pid, the rank it held in each plan
    # generation, and how it ended. The index survives an agent restart (it is on disk) and
    # lets ``tenax logs`` find a process by rank in any generation, or by node and slot.
    def _write_log_index(self, worker: Worker) -> None:
        entry = {"node": self.node_id, "slot": worker.slot, "pid": worker.pid, "log": worker.log_path.name,
                 "started": worker.started, "ranks": {str(g): r for g, r in sorted(worker.ranks.items())},
                 "state": worker.state, "exit_code": worker.exit_code, "signal": worker.signal,
                 "cause": worker.cause, "last_error": worker.last_error, "log_start": worker.log_start}
        path = worker.log_path.with_name(worker.log_path.name + ".json")
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:  # the log itself still exists; only the index entry is missing
            log.warning("log index of job %s slot %d not written: %r", worker.job, worker.slot, exc)

    def log_index(self, job: str) -> list[dict[str, Any]]:
        """This node's index entries for ``job`` (oldest process first); [] if none."""
        out = []
        for path in sorted(self._job_dir(job).glob("*.log.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return sorted(out, key=lambda e: float(e.get("started", 0) or 0))

    def log_file(self, job: str, name: str) -> Path | None:
        """The log named ``name`` of ``job`` if the index lists it (never any other file)."""
        for entry in self.log_index(job):
            if entry.get("log") == name:
                return self._job_dir(job) / name
        return None

    def _worker_files(self, job: str, a: WorkerAssignment, generation: int) -> tuple[Path, Path]:
        """(log, metrics file) of a new worker: one pair per process. A survivor keeps writing to
        the files it started with whatever its rank becomes, so a worker started for a later
        generation gets its own names (``rank-R-gG``) instead of sharing ``rank-R``."""
        stem = f"rank-{a.rank}" if generation <= 1 else f"rank-{a.rank}-g{generation}"
        job_dir = self._job_dir(job)
        return job_dir / f"{stem}.log", job_dir / f"{stem}.metrics.jsonl"

    def _checkpoint_dir(self, job: str, run_dir: Path) -> Path:
        """The job's disk checkpoints: in the shared directory when the agent has one (made here,
        owner-only, as the run dir), else in the run dir on this node."""
        if self.checkpoint_dir is None:
            return run_dir / "checkpoints"
        path = self.checkpoint_dir / job
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    async def _start(self, plan: Plan, a: WorkerAssignment, spec: dict[str, Any] | None, *,
                     growth_id: str = "") -> None:
        spec = spec_with_checked_data_path(spec, self.data_roots)  # DataPathRefused: reported, never started
        job_dir = self._job_dir(plan.job_id)
        run_dir = job_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        job_dir.chmod(0o700)  # logs, launch files (the spec) and run dir: the agent's user only
        launch_file = job_dir / f"launch-g{plan.generation}-rank-{a.rank}.json"
        launch_file.write_text(json.dumps({"spec": spec or {}, "plan": plan.to_dict()}, sort_keys=True))
        log_path, metrics_path = self._worker_files(plan.job_id, a, plan.generation)
        metrics_path.touch()
        env = worker_environment(os.environ)
        env.update(self.extra_env)
        env.update({
            launch.JOB_ID: plan.job_id,
            launch.RANK: str(a.rank),
            launch.LAUNCH_FILE: str(launch_file),
            launch.METRICS_FILE: str(metrics_path),
            launch.RUN_DIR: str(run_dir),
            launch.CHECKPOINT_DIR: str(self._checkpoint_dir(plan.job_id, run_dir)),
            launch.PLAN_FILE: str(self.plan_file(plan.job_id)),
            launch.NODE_ID: self.node_id,
            "PYTHONUNBUFFERED": "1",
        })
        ready_file = job_dir / f"ready-slot-{a.slot}.json"
        if growth_id:  # prepare, say READY (relayed by _relay_ready), join only once plan g+1 is written
            ready_file.unlink(missing_ok=True)  # an earlier growth's
            env[launch.GROWTH_ID] = growth_id
            env[launch.READY_FILE] = str(ready_file)
        device = str(((spec or {}).get("resources") or {}).get("device", "cpu"))
        # CPU jobs must not grab a GPU of this host; CUDA jobs get exactly their slot's device(s).
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(device, a.slot, self.slot_devices or
                                                      [str(i) for i in range(a.slot + 1)])
        offset = metrics_path.stat().st_size  # a restarted rank appends: relay only the new lines
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            log_file.write(f"--- tenax: rank {a.rank} generation {plan.generation} on {self.node_id} "
                           f"at {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
            log_file.flush()
            await self._wait_slot_reaped(a.slot)
            lifeline, lifeline_w = open_lifeline()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *with_parent_death_signal(self.worker_command, os.getpid()), env=env, cwd=str(run_dir),
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                    pass_fds=(lifeline_w,))
            except BaseException:
                os.close(lifeline)
                raise
            finally:
                os.close(lifeline_w)
        resources = (spec or {}).get("resources") or {}
        worker = Worker(job=plan.job_id, rank=a.rank, slot=a.slot, generation=plan.generation, pid=proc.pid,
                        proc=proc, log_path=log_path, metrics_path=metrics_path, started=time.time(),
                        preparing=growth_id, log_start=log_start, metrics_offset=offset,
                        ranks={plan.generation: a.rank}, lifeline=lifeline,
                        memory_limit=memory_limit_bytes(float(resources.get("host_memory_gb") or 0.0),
                                                        self.memory_limit_gb))
        self._write_log_index(worker)
        if growth_id:
            self.preparing[(plan.job_id, a.slot)] = worker  # its rank key may still be a plan-g worker's
        else:
            old = self.workers.get((plan.job_id, a.rank))
            if old is not None:
                self._history.append(old.view())
            self.workers[(plan.job_id, a.rank)] = worker
        worker.relay = ProgressRelay(etcd=self.etcd, keys=self.keys, job=plan.job_id, rank=a.rank,
                                     path=metrics_path, offset=offset, generation=plan.generation,
                                     min_interval_s=self.progress_interval_s,
                                     relay_steps=_is_metrics_rank(plan, a),
                                     on_first_record=lambda w=worker: self._mark_running(w))
        worker.relay.start()
        self._spawn(self._watch_exit(worker))
        self._spawn(self._report(worker))
        if growth_id:
            self._spawn(self._relay_ready(worker, ready_file))
        log.info("started job %s rank %d (pid %d, slot %d, generation %d%s)", plan.job_id, a.rank, proc.pid,
                 a.slot, plan.generation, f", preparing for growth {growth_id}" if growth_id else "")

    async def _report_start_failure(self, plan: Plan, a: WorkerAssignment, exc: OSError, *,
                                    growth_id: str = "") -> None:
        log.error("job %s rank %d could not start: %r", plan.job_id, a.rank, exc)
        metrics.WORKER_EXITS.labels("error").inc()
        if growth_id:  # the growth is abandoned on this report; never tried again for this id
            self._history.append(LocalWorker(job=plan.job_id, rank=a.rank, slot=a.slot, generation=plan.generation,
                                             alive=False, preparing=growth_id))
            await self._put_joiner(plan.job_id, JoinerRecord(
                growth_id=growth_id, node=self.node_id, slot=a.slot, state="FAILED", time=time.time(),
                reason=f"could not start the worker: {exc}"))
            return
        self._history.append(LocalWorker(job=plan.job_id, rank=a.rank, slot=a.slot, generation=plan.generation,
                                         alive=False))
        record = WorkerStatusRecord(rank=a.rank, node=self.node_id, state="FAILED", slot=a.slot, exit_code=127,
                                    generation=plan.generation, time=time.time()).to_dict()
        record["reason"] = f"could not start the worker: {exc}"
        try:
            await self.etcd.put(self.keys.job_worker(plan.job_id, a.rank), json.dumps(record))
        except (EtcdError, EtcdUnavailable) as put_exc:
            log.warning("start failure of job %s rank %d not reported: %r", plan.job_id, a.rank, put_exc)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _mark_running(self, worker: Worker) -> None:
        if worker.alive and worker.state == "STARTING":
            worker.state = "RUNNING"
            self._export_counts()
            self._spawn(self._report(worker))

    # ---------------------------------------------------------------- exit
    async def _watch_exit(self, worker: Worker) -> None:
        if worker.proc is None:
            return
        returncode = await self._first_sign_of_exit(worker)
        worker.exited_at = time.monotonic()
        exited_time = time.time()
        state, sig, reason = exit_state(returncode, bool(worker.stop_reason))
        worker.state, worker.signal = state, sig
        worker.exit_code = returncode if returncode >= 0 else 128 - returncode
        metrics.WORKER_EXITS.labels(reason).inc()
        self._kill_group(worker.pid, signal.SIGKILL)  # leftovers of its process group, if any
        failed = state == "FAILED" or bool(worker.cause)
        if failed:  # the tail of a log is read only after a failure (a few ms, before the report)
            worker.last_error = events.last_exception_line(events.log_tail(worker.log_path, start=worker.log_start))
        await self._report(worker)
        worker.exit_reported.set()
        self.last_exit_report_s = time.monotonic() - worker.exited_at
        metrics.EXIT_REPORT_LATENCY.set(self.last_exit_report_s)
        log.info("job %s rank %d exited: %s code=%s %s (reported in %.1f ms)", worker.job, worker.rank, state,
                 worker.exit_code, sig, self.last_exit_report_s * 1000)
        self._write_log_index(worker)
        if failed and not worker.preparing:
            await self._exit_event(worker, exited_time)
        if worker.relay:
            await worker.relay.stop()  # drains the file: the last steps are published too
        self._export_counts()

    async def _first_sign_of_exit(self, worker: Worker) -> int:
        """The worker's return code, as soon as the kernel begins its exit (its lifeline closes
        and /proc says it is exiting) or it is reaped, whichever comes first."""
        reaped = asyncio.ensure_future(worker.proc.wait())
        worker.reaped = reaped
        self._reaping[worker.slot] = reaped
        if worker.lifeline is None:
            return await reaped
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(worker.lifeline, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data and not closed.done():
                closed.set_result(True)

        loop.add_reader(worker.lifeline, readable)
        try:
            await asyncio.wait({reaped, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(worker.lifeline)
            os.close(worker.lifeline)
            worker.lifeline = None
        if reaped.done():
            return reaped.result()
        code = dying_returncode(worker.pid)
        if code is None:  # its end was closed by something else than an exit: the reaper decides
            return await reaped
        metrics.EARLY_EXITS.inc()
        return code

    async def _wait_slot_reaped(self, slot: int) -> None:
        """A new worker takes a slot only once the previous one there is reaped: a dying
        worker's GPU memory is released at the end of its teardown (bounded wait)."""
        reaped = self._reaping.get(slot)
        if reaped is None or reaped.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(reaped), self.reap_wait_s)
        except asyncio.TimeoutError:
            log.warning("slot %d: the previous worker is still exiting after %.0f s; starting anyway",
                        slot, self.reap_wait_s)

    async def _exit_event(self, worker: Worker, exited_time: float) -> None:
        """A ``worker-exit`` job event for a worker that failed or was killed for a cause: the
        evidence only this agent has (exit code, signal, the log's last exception line)."""
        how = f"signal {worker.signal}" if worker.signal else f"exit code {worker.exit_code}"
        message = f"rank {worker.rank} on {self.node_id} slot {worker.slot} {worker.state.lower()} ({how})"
        if worker.cause:
            message += f": {worker.cause}"
        if worker.last_error:
            message += f"; last error: {worker.last_error}"
        latest = worker.relay.latest if worker.relay is not None else None
        step = int(latest.get("step", 0) or 0) if isinstance(latest, dict) else 0
        event = events.new_event("worker-exit", message, now=exited_time, step=step,
                                 action="reported to the controller", data={
            "rank": worker.rank, "node": self.node_id, "slot": worker.slot, "pid": worker.pid,
            "generation": worker.generation, "state": worker.state, "exit_code": worker.exit_code,
            "signal": worker.signal, "cause": worker.cause, "last_error": worker.last_error,
            "log": worker.log_path.name})
        try:
            await asyncio.wait_for(events.emit(self.etcd, self.keys, worker.job, event), 5.0)
        except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:  # the status record says it too
            log.warning("worker-exit event of job %s rank %d not written: %r", worker.job, worker.rank, exc)

    def status_record(self, worker: Worker) -> dict[str, Any]:
        """The WorkerStatusRecord at Keys.job_worker, plus context readers may ignore."""
        record = WorkerStatusRecord(rank=worker.rank, node=self.node_id, state=worker.state, slot=worker.slot,
                                    pid=worker.pid, exit_code=worker.exit_code, signal=worker.signal,
                                    generation=worker.generation, time=time.time(), cause=worker.cause,
                                    last_error=worker.last_error, permanent=worker.permanent).to_dict()
        record.update(reason=worker.stop_reason, log=str(worker.log_path), started=worker.started)
        return record

    # ---------------------------------------------------------------- memory limit
    async def watch_memory(self, interval_s: float = MEMORY_POLL_S) -> None:
        """Kill every worker whose process tree's resident set passes its limit (runs until cancelled)."""
        while True:
            await asyncio.sleep(interval_s)
            for worker in self.all_workers():
                if worker.alive and worker.memory_limit is not None and not worker.cause:
                    cause = memory_verdict(tree_rss(worker.pid), worker.memory_limit)
                    if cause is not None:
                        self.kill_for_memory(worker, cause)

    def kill_for_memory(self, worker: Worker, cause: str) -> None:
        """SIGKILL at once (it is still growing); the exit report carries the cause, and
        ``permanent`` tells the controller that another slot would not help."""
        log.error("job %s rank %d (pid %d): %s: killing it", worker.job, worker.rank, worker.pid, cause)
        worker.cause, worker.permanent = cause, True
        worker.stop_reason = worker.stop_reason or cause
        self._kill_group(worker.pid, signal.SIGKILL)

    async def _put_joiner(self, job: str, record: JoinerRecord, *, tries: int = 20) -> None:
        """Write a joiner record, retrying for a while while etcd is unavailable (the growth
        deadline covers a lost one); a refused write is not retried."""
        backoff = Backoff(0.05, 1.0)
        for _ in range(tries):
            try:
                await self.etcd.put(self.keys.job_joiner(job, record.node, record.slot), record.to_json())
                return
            except EtcdUnavailable as exc:
                log.warning("joiner record of job %s slot %d not written (will retry): %r", job, record.slot, exc)
                await backoff.sleep()
            except EtcdError as exc:
                log.error("joiner record of job %s slot %d (%s) skipped, etcd refused it: %s", job, record.slot,
                          record.state, exc)
                return

    async def _relay_ready(self, worker: Worker, path: Path) -> None:
        """Relay a preparing worker's READY (its ready file) to etcd, as this agent's record:
        the node, slot, pid and growth id are the agent's, only ``prepare_s`` is the worker's."""
        growth_id = worker.preparing
        while worker.alive and worker.preparing == growth_id:
            try:
                raw = path.read_text()
            except FileNotFoundError:
                await asyncio.sleep(READY_POLL_S)
                continue
            except OSError as exc:
                log.warning("job %s slot %d: ready file unreadable: %r", worker.job, worker.slot, exc)
                return
            said = parse_or_none(JoinerRecord, raw, log, str(path))
            if said is None or said.growth_id != growth_id or said.state != "READY":
                log.warning("job %s slot %d: ignoring ready file %s", worker.job, worker.slot, raw[:200])
                return
            await self._put_joiner(worker.job, JoinerRecord(
                growth_id=growth_id, node=self.node_id, slot=worker.slot, state="READY", pid=worker.pid,
                time=time.time(), prepare_s=said.prepare_s))
            return

    async def _report(self, worker: Worker) -> None:
        """Write the worker's current status; retry while etcd is unavailable (the latest state wins),
        not when etcd refuses the write. A preparing worker has no rank key yet: only its exit is
        reported, as a joiner record."""
        if worker.preparing:
            if not worker.alive:  # ended before its growth switched: the controller abandons it now
                await self._put_joiner(worker.job, JoinerRecord(
                    growth_id=worker.preparing, node=self.node_id, slot=worker.slot, state=worker.state,
                    pid=worker.pid, time=time.time(), reason=worker.stop_reason or (
                        f"signal {worker.signal}" if worker.signal else f"exit code {worker.exit_code}")))
            return
        backoff = Backoff(0.05, 1.0)
        async with worker._report_lock:
            while True:
                if worker.retired:
                    return  # its old rank key may belong to another worker of the new generation
                record = self.status_record(worker)
                try:
                    await self.etcd.put(self.keys.job_worker(worker.job, worker.rank), json.dumps(record))
                    return
                except EtcdUnavailable as exc:
                    log.warning("report job %s rank %d %s failed (will retry): %r", worker.job, worker.rank,
                                worker.state, exc)
                    await backoff.sleep()
                except EtcdError as exc:
                    log.error("report job %s rank %d %s skipped, etcd refused it: %s", worker.job, worker.rank,
                              worker.state, exc)
                    return

    # ---------------------------------------------------------------- stop
    @staticmethod
    def _kill_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, job: str, rank: int, reason: str) -> None:
        """Stop the worker that holds ``rank`` of ``job`` now (see ``_stop_worker``)."""
        worker = self.workers.get((job, rank))
        if worker is not None:
            await self._stop_worker(worker, reason)

    async def _stop_worker(self, worker: Worker, reason: str) -> None:
        """SIGTERM the worker's group, SIGKILL after the grace period; returns once it exited."""
        job, rank = worker.job, worker.rank
        if not worker.alive or worker.proc is None:
            return
        worker.stop_reason = worker.stop_reason or reason
        self._kill_group(worker.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(worker.proc.wait()), self.kill_grace_s)
        except asyncio.TimeoutError:
            log.warning("job %s rank %d ignored SIGTERM for %.1f s: SIGKILL", job, rank, self.kill_grace_s)
            self._kill_group(worker.pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.shield(worker.proc.wait()), 10.0)
        try:  # the exit watcher reports it; wait for that, but never forever (etcd may be down)
            await asyncio.wait_for(worker.exit_reported.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("job %s rank %d: exit not reported yet (etcd slow or down); still retrying", job, rank)

    async def stop_all(self, reason: str, *, report_timeout_s: float = 3.0) -> None:
        """Stop every live worker (agent shutdown); reports are best effort within the timeout."""
        live = [w for w in self.all_workers() if w.alive]
        for w in live:
            w.stop_reason = reason
        if live:
            await asyncio.gather(*(self._stop_worker(w, reason) for w in live), return_exceptions=True)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=report_timeout_s)
        for t in list(self._tasks):
            t.cancel()

    def kill_all_now(self) -> None:
        """Last resort (synchronous): SIGKILL every live worker group."""
        for w in self.all_workers():
            if w.alive:
                self._kill_group(w.pid, signal.SIGKILL)

    # ---------------------------------------------------------------- metrics
    def _export_counts(self) -> None:
        counts = {"STARTING": 0, "RUNNING": 0}
        for w in self.all_workers():
            if w.alive:
                counts[w.state] = counts.get(w.state, 0) + 1
        for state, n in counts.items():
            metrics.AGENT_WORKERS.labels(state).set(n)

    def used_slots(self) -> int:
        return sum(1 for w in self.all_workers() if w.alive)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def worker_environment(agent_env: dict[str, str] | os._Environ) -> dict[str, str]:
    """The agent's environment minus what workers must not see: every variable that names
    etcd (the agent's endpoints, TLS files, etcdctl settings; workers follow the plan file,
    not etcd) and the per-worker launch variables (the supervisor sets those it means)."""
    return {name: value for name, value in agent_env.items()
            if "ETCD" not in name.upper() and name not in launch.PER_WORKER}


def _is_metrics_rank(plan: Plan, a: WorkerAssignment) -> bool:
    return is_metrics_rank(a.dp_rank, a.pp_rank, plan.pp)
