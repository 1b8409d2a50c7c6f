"""Flight Recorder dumps on a hang decision: collect them, and say who is behind (pure analysis).

``analyse(dumps, missing)`` is pure: from each answering rank's dump (PyTorch's Flight
Recorder entries, plus what trainer/flight.py adds: the Python stack and what the main
thread waits in) it finds, per waiting rank, the collective it waits in (the newest entry
not retired: process group, its ranks, the collective sequence number, the operation) or,
where the recorder has no entry (gloo records no point-to-point operations in torch 2.13),
the pipeline send/receive and its peer from the stack. A rank is *behind* when a waiting
rank waits for it and it either sent no dump (a stopped process cannot) or has not
reached that collective (its last sequence number on that group is lower). The ranks
named behind by the most waiters are the finding's culprits.

``collect`` sends a dump request to every node of the plan and waits ``COLLECT_WAIT_S``
for their records (protos/flight.py has the protocol).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from common.etcd import EtcdError, EtcdUnavailable
from controller import chaos
from controller.handle import ControllerHandle
from protos import flight
from protos.chaos import FLIGHT_DUMP, ChaosRecord
from protos.plan import Plan

log = logging.getLogger("tenax.controller.flight")


@dataclass(kw_only=True)
class Wait:
    """What one answering rank waits in."""

    rank: int
    op: str
    """``gloo:all_reduce``... (the recorder's profiling name) or the trainer's ``what``."""
    group: str = ""
    """Process group name (recorder entries only)."""
    group_ranks: list[int] = field(default_factory=list)
    seq: int = -1
    """Collective sequence number in ``group`` (recorder entries), -1 if not from the recorder."""
    peer: int = -1
    """Point-to-point peer (from the stack), -1 if none."""
    waiting_for: list[int] = field(default_factory=list)
    """Ranks it waits for (behind, or silent)."""
    stack_top: str = ""
    source: str = "flight-recorder"
    """``flight-recorder`` or ``worker-stack``."""


@dataclass(kw_only=True)
class Finding:
    behind: list[int] = field(default_factory=list)
    """The ranks the most waiting ranks wait for."""
    silent: list[int] = field(default_factory=list)
    """Ranks that sent no dump (stopped or dead)."""
    waits: list[Wait] = field(default_factory=list)
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group_ranks(dump: Mapping[str, Any], group: str) -> list[int]:
    config = dump.get("pg_config")
    entry = config.get(group) if isinstance(config, dict) else None
    raw = entry.get("ranks") if isinstance(entry, dict) else None
    try:
        ranks = ast.literal_eval(raw) if isinstance(raw, str) else raw
        return [int(r) for r in ranks]
    except (ValueError, SyntaxError, TypeError):
        return []


def _last_seq(dump: Mapping[str, Any], group: str) -> int:
    """The newest collective sequence number this rank reached on ``group`` (-1: none)."""
    best = -1
    status = dump.get("pg_status")
    entry = status.get(group) if isinstance(status, dict) else None
    if isinstance(entry, dict):
        try:
            best = int(entry.get("last_enqueued_collective", -1))
        except (TypeError, ValueError):
            best = -1
    for e in dump.get("entries") or []:
        if isinstance(e, dict) and _group_of(e) == group and not e.get("is_p2p"):
            best = max(best, int(e.get("collective_seq_id", -1)))
    return best


def _group_of(entry: Mapping[str, Any]) -> str:
    pg = entry.get("process_group")
    return str(pg[0]) if isinstance(pg, (list, tuple)) and pg else ""


def _pending(dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Recorder entries not retired, newest first. gloo retires an entry only once its work is
    waited on, so a collective every member reached may still show here: ``analyse`` keeps
    only those some member has not reached."""
    entries = [e for e in dump.get("entries") or [] if isinstance(e, dict)]
    return [e for e in reversed(entries) if not e.get("retired", True) and e.get("state") != "completed"]


def analyse(dumps: Mapping[int, Mapping[str, Any]], missing: list[int], *, hung: list[int] | None = None
            ) -> tuple[Finding, str]:
    """(finding, reason) from the answering ranks' dumps and the ranks that sent none. Pure."""
    silent = sorted(set(missing) - set(dumps))
    waits: list[Wait] = []
    for rank in sorted(dumps):
        dump = dumps[rank]
        extra = dump.get("tenax") if isinstance(dump.get("tenax"), dict) else {}
        waiting = extra.get("waiting_in") if isinstance(extra.get("waiting_in"), dict) else {}
        stack = extra.get("python_stack") if isinstance(extra.get("python_stack"), list) else []
        own = [f for f in stack if isinstance(f, str) and "/torch/" not in f and "/threading.py" not in f]
        top = str(waiting.get("caller") or waiting.get("where") or (own[-1] if own else stack[-1] if stack else ""))
        blocked = None
        for entry in _pending(dump):
            group = _group_of(entry)
            members = _group_ranks(dump, group)
            seq = int(entry.get("collective_seq_id", -1))
            behind = [m for m in members
                      if m != rank and (m in silent or (m in dumps and _last_seq(dumps[m], group) < seq))]
            if behind:
                blocked = Wait(rank=rank, op=str(entry.get("profiling_name", "?")), group=group, group_ranks=members,
                               seq=seq, waiting_for=behind, stack_top=top)
                break
        if blocked is not None:
            waits.append(blocked)
        elif waiting.get("what"):
            peer = waiting.get("peer", -1)
            peer = peer if isinstance(peer, int) else -1
            behind = [peer] if peer >= 0 and (peer in silent or peer in dumps) else []
            waits.append(Wait(rank=rank, op=str(waiting["what"]), peer=peer, waiting_for=behind, stack_top=top,
                              source="worker-stack"))
    votes = Counter(r for w in waits for r in w.waiting_for)
    if votes:
        most = max(votes.values())
        behind = sorted(r for r, n in votes.items() if n == most)
    else:
        behind = list(silent)
    finding = Finding(behind=behind, silent=silent, waits=waits)
    finding.summary = describe(finding)
    agree = "" if hung is None or set(hung) == set(behind) else f" (the progress detector named {sorted(hung)})"
    return finding, finding.summary + agree


def describe(finding: Finding) -> str:
    if not finding.waits and not finding.behind:
        return "flight recorder: no dumps"
    parts = []
    for w in finding.waits:
        if w.source == "flight-recorder":
            where = f"{w.op} #{w.seq} of group {w.group or '?'} {w.group_ranks}"
        else:
            where = f"{w.op}" + (f" with rank {w.peer}" if w.peer >= 0 else "")
        parts.append(f"rank {w.rank} waits in {where}" + (f" for {w.waiting_for}" if w.waiting_for else "")
                     + (f" at {w.stack_top.rsplit('/', 1)[-1]}" if w.stack_top else ""))
    head = f"flight recorder: rank{'s' if len(finding.behind) != 1 else ''} {finding.behind} behind"
    silent = f"; no dump from {finding.silent}" if finding.silent else ""
    return f"{head}{silent}: " + "; ".join(parts)


# ------------------------------------------------------------------ collecting
async def collect(c: ControllerHandle, job: str, plan: Plan, now: float, *, wait_s: float = flight.COLLECT_WAIT_S
                  ) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Ask every node of ``plan`` for its ranks' dumps; (rank -> dump, ranks without one)."""
    nodes = sorted({w.node for w in plan.workers})
    request_id = chaos.new_request_id(now)
    for node in nodes:
        record = ChaosRecord(id=request_id, action=FLIGHT_DUMP, node=node, job=job, rank=0,
                             generation=plan.generation, reason="hang decision: flight recorder dump", time=now)
        try:
            await c.etcd.put(c.keys.chaos_request(node, request_id), record.to_json())
        except (EtcdError, EtcdUnavailable) as exc:
            log.warning("flight dump request to %s failed: %r", node, exc)
    records: dict[str, flight.FlightDumpRecord] = {}
    end = time.monotonic() + wait_s
    while len(records) < len(nodes) and time.monotonic() < end:
        await asyncio.sleep(0.1)
        for node in nodes:
            if node in records:
                continue
            try:
                kv = await c.etcd.get(c.keys.job_flight(job, plan.generation, node))
            except (EtcdError, EtcdUnavailable):
                continue
            if kv is None:
                continue
            try:
                record = flight.FlightDumpRecord.from_json(kv.value)
            except ValueError as exc:
                log.warning("flight dump record of %s: %s", node, exc)
                continue
            if record.id == request_id:
                records[node] = record
    dumps: dict[int, dict[str, Any]] = {}
    for record in records.values():
        dumps.update(record.decoded())
    missing = sorted(w.rank for w in plan.workers if w.rank not in dumps)
    await _prune(c, job, plan.generation)
    return dumps, missing


async def _prune(c: ControllerHandle, job: str, generation: int) -> None:
    """Keep the records of the newest KEEP_DUMPS generations of the job."""
    if generation - flight.KEEP_DUMPS < 0:
        return
    try:
        await c.etcd.delete_range(c.keys.job_flights(job),
                                  c.keys.job_flight(job, generation - flight.KEEP_DUMPS + 1, ""))
    except (EtcdError, EtcdUnavailable, AttributeError) as exc:
        log.debug("flight dump pruning skipped: %r", exc)


async def diagnose_hang(c: ControllerHandle, job: str, plan: Plan, hung: list[int], now: float) -> tuple[Finding, str]:
    """Collect the dumps and analyse them (the health loop calls this before it kills)."""
    try:
        dumps, missing = await collect(c, job, plan, now)
    except Exception as exc:  # noqa: BLE001 - a failed diagnosis must not stop the kill
        log.exception("flight recorder collection failed")
        return Finding(summary=f"flight recorder: collection failed: {exc!r}"), f"collection failed: {exc!r}"
    return analyse(dumps, missing, hung=hung)
