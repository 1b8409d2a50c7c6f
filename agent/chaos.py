"""Chaos and kill requests: the agent side (see controller/chaos.py for the controller side).

The agent watches ``Keys.chaos(node)`` and carries out each request once, then
deletes it (a restarted agent never repeats one):

    kill       SIGKILL to the rank's process group: the supervisor sees the exit in
               milliseconds and reports it (recovery starts from there)
    hang       SIGSTOP to the rank's process group: it stops progressing and stops
               sending heartbeats, exactly what the hang detector must catch
    slow       writes ``<run dir>/chaos-rank-<R>.json`` {"slow_factor": f}; the worker
               reads it at most once per step (trainer/telemetry.py) and stretches its
               compute by the factor; factor 1 removes the slowdown
    kill-node  SIGKILL every worker, then the agent exits at once WITHOUT revoking its
               lease: the controller sees the node lost when the lease expires (a crash)

A request for a rank this node no longer runs, or for an older generation than
the worker's (it was restarted or adopted since), is dropped with a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Callable

import psutil

from agent import flight
from agent.rank_health import RankHealthPublisher
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from common.retry import Backoff
from protos.chaos import FLIGHT_DUMP, ChaosRecord
from protos.keys import Keys

log = logging.getLogger("agent.chaos")

KILL_NODE_EXIT_CODE = 137
"""Exit status of an agent killed by chaos kill-node (as if SIGKILLed)."""


def slow_control_file(run_dir: Path, rank: int) -> Path:
    """Where the worker of ``rank`` looks for its chaos slowdown (in its TENAX_RUN_DIR)."""
    return Path(run_dir) / f"chaos-rank-{rank}.json"


def write_slow_factor(run_dir: Path, rank: int, factor: float) -> Path:
    """Atomically (write + rename) set the slowdown a worker applies to its compute."""
    path = slow_control_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"slow_factor": factor}))
    os.replace(tmp, path)
    return path


def process_stopped(pid: int) -> bool:
    """True if the process is stopped by a signal (SIGSTOP, SIGTSTP): state ``T`` in /proc."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except (psutil.Error, OSError):
        return False


def kill_cause(reason: str, *, stopped: bool) -> str:
    """The root cause a kill request carries to the worker's exit report. Pure.

    ``kill_cause("hang: rank 1 made no progress for 4.1 s", stopped=True)`` ->
    ``hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP; killed``."""
    text = " ".join((reason or "kill requested").split())[:400]
    seen = ", stopped by SIGSTOP" if stopped and "SIGSTOP" not in text else ""
    return f"{text}{seen}; killed"


def start_agent_tasks(agent) -> list[asyncio.Task]:
    """The agent's detection-side tasks: the chaos/kill executor and the rank telemetry publisher."""
    agent.chaos = ChaosExecutor(etcd=agent.etcd, keys=agent.keys, node_id=agent.settings.node_id,
                                supervisor=agent.supervisor)
    agent.rank_health = RankHealthPublisher(etcd=agent.etcd, keys=agent.keys, node_id=agent.settings.node_id,
                                            supervisor=agent.supervisor,
                                            interval_s=min(agent.settings.progress_interval_s, 1.0))
    return [asyncio.create_task(agent.chaos.run(), name="chaos"),
            asyncio.create_task(agent.rank_health.run(), name="rank-health")]


def _crash_now() -> None:
    logging.shutdown()
    os._exit(KILL_NODE_EXIT_CODE)


class ChaosExecutor:
    """Watches this node's chaos prefix and carries out what arrives."""

    def __init__(self, *, etcd: Etcd, keys: Keys, node_id: str, supervisor,
                 crash: Callable[[], None] = _crash_now) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.supervisor = supervisor
        self.crash = crash
        """Ends the agent like a crash (tests replace it)."""
        self.done: list[tuple[ChaosRecord, str]] = []
        """(request, outcome) of every request handled (tests and logs)."""
        self._handled: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        prefix = self.keys.chaos(self.node_id)
        while True:
            try:
                # A write's revision taken before the read: the watch from just after it
                # replays anything the read missed (handled ids are skipped).
                revision = await self.etcd.put(self.keys.revision_probe(), "")
                for kv in await self.etcd.get_prefix(prefix):
                    await self.handle(kv.key, kv.value)
                backoff.reset()
                async for ev in self.etcd.watch_prefix(prefix, start_revision=revision + 1):
                    if ev.kind == "put":
                        await self.handle(ev.key, ev.value)
                raise EtcdUnavailable("chaos watch ended")
            # The watch must survive both: a fresh read also cures a refused watch (compacted revision).
            except (EtcdError, EtcdUnavailable) as exc:
                log.warning("chaos watch broken (will retry): %r", exc)
                await backoff.sleep()
            except Exception:  # a bug must not end the watch for good
                log.exception("chaos watch failed; restarting it")
                await backoff.sleep()

    async def handle(self, key: str, value: str) -> str:
        """Carry out one request (once) and delete it; returns what happened."""
        try:
            record = ChaosRecord.from_json(value)
        except ValueError as exc:
            log.warning("dropping malformed chaos request at %s: %s", key, exc)
            await self._delete(key)
            return "malformed"
        if record.id in self._handled:
            return "duplicate"
        self._handled.add(record.id)
        if record.action == FLIGHT_DUMP:
            # in the background: the dumps take up to a deadline, and kills must not queue behind it
            await self._delete(key)
            task = asyncio.create_task(flight.answer(self.etcd, self.keys, self.node_id, self.supervisor, record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            outcome = "flight dump requested"
        elif record.action == "kill-node":
            # Delete first: the crash ends this process, and a restarted agent must not repeat it.
            await self._delete(key)
            outcome = self._kill_node(record)
        else:
            outcome = self._rank_action(record)
            await self._delete(key)
        self.done.append((record, outcome))
        log.warning("chaos %s (%s): %s", record.action, record.reason or "no reason given", outcome)
        return outcome

    async def _delete(self, key: str) -> None:
        try:
            await asyncio.wait_for(self.etcd.delete(key), 5.0)
        except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
            log.warning("could not delete chaos request %s: %r", key, exc)

    def _rank_action(self, record: ChaosRecord) -> str:
        worker = self.supervisor.workers.get((record.job, record.rank))
        if worker is None or not worker.alive:
            return f"job {record.job} rank {record.rank} has no live worker here: nothing done"
        if record.generation and worker.generation > record.generation:
            return (f"job {record.job} rank {record.rank} is at generation {worker.generation}, the request was "
                    f"for {record.generation}: nothing done")
        if record.action == "kill":
            # the root cause goes with the exit report (the recovery's cause), not just "killed"
            worker.cause = kill_cause(record.reason, stopped=process_stopped(worker.pid))
            self._signal(worker.pid, signal.SIGKILL)
            return f"SIGKILL job {record.job} rank {record.rank} (pid {worker.pid}): {worker.cause}"
        if record.action == "hang":
            self._signal(worker.pid, signal.SIGSTOP)
            return f"SIGSTOP job {record.job} rank {record.rank} (pid {worker.pid})"
        run_dir = self.supervisor.work_dir / "jobs" / record.job / "run"
        path = write_slow_factor(run_dir, record.rank, record.factor)
        return f"job {record.job} rank {record.rank} slowed x{record.factor:g} ({path})"

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # the worker leads its own process group (start_new_session)
        except ProcessLookupError:
            pass

    def _kill_node(self, record: ChaosRecord) -> str:
        self.supervisor.kill_all_now()
        log.error("chaos kill-node: workers killed, agent %s exits without revoking its lease", self.node_id)
        self.crash()
        return "workers killed, agent crashed"
