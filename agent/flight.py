"""The agent's side of a Flight Recorder dump request (protocol: protos/flight.py).

On a ``flight-dump`` request for a job, the agent asks its live workers of that job for
their dumps (the request file in the job's run directory), waits for their files until
``DUMP_DEADLINE_S``, and publishes one FlightDumpRecord for the node. A stopped worker
(SIGSTOP: the kernel shows state T) cannot answer: it is listed as missing without waiting
for the deadline, so the kill of a hung rank does not wait for it. The full dumps stay on this node's disk, the
newest ``KEEP_DUMPS`` requests per job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from agent import metrics
from agent.rank_health import process_stopped
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from protos import flight
from protos.chaos import ChaosRecord
from protos.keys import Keys

log = logging.getLogger("agent.flight")


def write_request(run_dir: Path, request_id: str, now: float) -> None:
    path = flight.request_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": request_id, "time": now}))
    os.replace(tmp, path)


def trimmed(dump: dict[str, Any]) -> dict[str, Any]:
    """The dump with only its newest MAX_ENTRIES_SHIPPED entries (what goes into etcd)."""
    entries = dump.get("entries") if isinstance(dump.get("entries"), list) else []
    return {**dump, "entries": entries[-flight.MAX_ENTRIES_SHIPPED:]}


def prune(run_dir: Path, keep: int = flight.KEEP_DUMPS) -> None:
    """Remove all but the newest ``keep`` dump directories (request ids sort by time)."""
    base = flight.flight_dir(run_dir)
    dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    for old in dirs[:-keep] if keep > 0 else dirs:
        shutil.rmtree(old, ignore_errors=True)


async def collect(run_dir: Path, request_id: str, ranks: list[int], *, deadline_s: float = flight.DUMP_DEADLINE_S,
                  cannot_answer: Callable[[int], bool] = lambda rank: False
                  ) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Ask the local workers for their dumps; (rank -> dump, ranks missing at the deadline).

    ``cannot_answer(rank)``: the rank's process is stopped by a signal, so its dump thread
    cannot write a file; waiting for it would only delay the kill of the hung rank (the
    hang's recovery) by the whole deadline. Such a rank is missing at once, unless it
    answered already."""
    write_request(run_dir, request_id, time.time())
    directory = flight.dump_dir(run_dir, request_id)
    end = time.monotonic() + deadline_s
    dumps: dict[int, dict[str, Any]] = {}
    while True:
        for rank in ranks:
            path = flight.dump_file(directory, rank)
            if rank not in dumps and path.exists():
                try:
                    dumps[rank] = pickle.loads(path.read_bytes())  # written by our own worker process
                except Exception as exc:  # noqa: BLE001 - a torn or foreign file: report it missing
                    log.warning("unreadable flight dump %s: %r", path, exc)
        waiting = [r for r in ranks if r not in dumps and not cannot_answer(r)]
        if not waiting or time.monotonic() >= end:
            break
        await asyncio.sleep(flight.POLL_S)
    prune(run_dir)
    return dumps, [r for r in ranks if r not in dumps]


async def answer(etcd: Etcd, keys: Keys, node_id: str, supervisor, record: ChaosRecord) -> str:
    """Carry out a flight-dump request for ``record.job``: collect, then publish the node's record."""
    pids = {rank: w.pid for (job, rank), w in supervisor.workers.items() if job == record.job and w.alive}
    ranks = sorted(pids)
    run_dir = supervisor.work_dir / "jobs" / record.job / "run"
    dumps, missing = await collect(run_dir, record.id, ranks,
                                   cannot_answer=lambda rank: bool(process_stopped(pids[rank]))) if ranks else ({}, [])
    out = flight.FlightDumpRecord(id=record.id, job=record.job, generation=record.generation, node=node_id,
                                  time=time.time(), missing=missing,
                                  dumps={str(r): flight.pack(trimmed(d)) for r, d in dumps.items()})
    try:
        await asyncio.wait_for(etcd.put(keys.job_flight(record.job, record.generation, node_id), out.to_json()), 5.0)
    except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
        log.warning("could not publish flight dumps of job %s: %r", record.job, exc)
        return f"flight dumps of ranks {sorted(dumps)} not published: {exc!r}"
    return f"flight dumps of job {record.job}: ranks {sorted(dumps)}, missing {missing}"


# ------------------------------------------------------------------ per-kind communication times
_comm_kinds: dict[tuple[str, str], set[str]] = {}
"""(job, rank) -> the kinds exported for it (so that a finished job's series can be removed)."""


def export_comm(job: str, rank: int, comm: Any) -> None:
    """``tenax_rank_comm_seconds{job,rank,kind}`` from a step line's ``comm`` (trainer/comm.py)."""
    kinds = comm.get("kind") if isinstance(comm, dict) else None
    if not isinstance(kinds, dict):
        return
    for kind, seconds in kinds.items():
        if isinstance(kind, str) and isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            metrics.RANK_COMM_SECONDS.labels(job, str(rank), kind).set(seconds)
            _comm_kinds.setdefault((job, str(rank)), set()).add(kind)


def forget_comm(job: str, rank: int) -> None:
    for kind in _comm_kinds.pop((job, str(rank)), set()):
        try:
            metrics.RANK_COMM_SECONDS.remove(job, str(rank), kind)
        except KeyError:
            pass
