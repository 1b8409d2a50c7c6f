"""Job events: the timeline of every decision and change of a job (DESIGN principle 10).

One event is a ``protos.records.JobEventRecord``: kind, time, the job's step, a one-line
message (what happened and why), the evidence (``data``) and the action taken. The
controller writes decisions (hang, straggler, node-lost, plan, recovery, growth, drain,
phase); an agent writes what only it sees (worker-exit with the last exception line of
the worker's log, xid). Events are read back with ``read_events`` (sorted by time).

Keys: ``Keys.job_event_at(job, time_ns, suffix)`` (time-ordered; ``suffix`` is random, or
derived from what the event is about so that two controller replicas writing the same
event write the same key); older keys ``Keys.job_event(job, seq)`` (plan, recovery and
straggler events keyed by generation) are read the same way.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any, Mapping

from common.etcd import Etcd
from protos.keys import Keys
from protos.records import JobEventRecord, RecordError

log = logging.getLogger(__name__)

EVENT_KINDS = ("hang", "rendezvous-timeout", "straggler", "node-lost", "xid", "worker-exit", "plan", "recovery",
               "growth", "drain", "phase", "note")
"""Every kind of job event (proto JobEventEntry.kind)."""

MAX_MESSAGE_CHARS = 500
"""A message is one line; longer ones are cut (the evidence keeps the details)."""
MAX_EVENTS_READ = 1000
"""``read_events`` returns at most the newest this many."""
DEFAULT_EVENTS_LIMIT = 200
"""What the API returns when the caller gives no limit."""
LAST_ERROR_SCAN_BYTES = 64 * 1024
"""How much of the end of a worker's log is searched for its last exception line."""
MAX_ERROR_CHARS = 300

# "ValueError: x", "torch.distributed.DistBackendError: ...", "RuntimeError", "[..] gloo ... Error"
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Timeout)\b[^\n]*)$")


def new_event(kind: str, message: str, *, now: float | None = None, step: int = 0, action: str = "",
              data: Mapping[str, Any] | None = None) -> JobEventRecord:
    """A JobEventRecord with a checked kind and a one-line message. Pure (given ``now``)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"kind: must be one of {EVENT_KINDS}, got {kind!r}")
    line = " ".join(str(message).split())[:MAX_MESSAGE_CHARS]
    return JobEventRecord(kind=kind, time=time.time() if now is None else float(now), data=dict(data or {}),
                          message=line, step=max(int(step), 0), action=" ".join(str(action).split())[:200])


def event_key(keys: Keys, job: str, event: JobEventRecord, suffix: str = "") -> str:
    return keys.job_event_at(job, int(event.time * 1e9), suffix or secrets.token_hex(4))


async def emit(etcd: Etcd, keys: Keys, job: str, event: JobEventRecord, *, suffix: str = "",
               once: bool = False) -> bool:
    """Write ``event``; ``once``: only if its key does not exist yet (an idempotent rewrite by
    another replica). Raises EtcdError / EtcdUnavailable like any write; returns False only
    when ``once`` found the key taken."""
    key = event_key(keys, job, event, suffix)
    if once:
        return await etcd.create(key, event.to_json())
    await etcd.put(key, event.to_json())
    return True


def describe(event: JobEventRecord) -> str:
    """The event's message; for records written before messages existed, one rendered from
    its data. Pure."""
    if event.message:
        return event.message
    d = event.data
    if event.kind == "plan":
        text = f"plan generation {d.get('generation', '?')}: {d.get('reason', '')}".strip()
        cause = str(d.get("cause", ""))
        return f"{text} (cause: {cause})" if cause and not str(d.get("reason", "")).startswith(cause) else text
    if event.kind == "recovery":
        return (f"recovered from {d.get('cause', '?')} in {float(d.get('total_s', 0) or 0):.2f} s "
                f"(generation {d.get('generation', '?')}, {_layout(d.get('old_layout'))} -> "
                f"{_layout(d.get('new_layout'))}, steps lost {d.get('steps_lost', 0)})"
                + (f"; survivors' communication failed: {d['comm_error']} ({d.get('comm_error_detail', '')})"
                   if d.get("comm_error") else ""))
    if event.kind == "straggler":
        flagged = d.get("flagged") if isinstance(d.get("flagged"), dict) else {}
        ranks = ", ".join(f"rank {r} (score {v.get('score', '?')})" for r, v in flagged.items()
                          if isinstance(v, dict))
        attribution = d.get("attribution") if isinstance(d.get("attribution"), dict) else {}
        if ranks or not attribution:
            text = f"straggler: {ranks or 'no rank'} flagged (policy {d.get('policy', '?')})"
            if attribution.get("reason"):
                text += f"; {attribution['reason']}"
        else:  # only communication: a slow link or peer (controller/attribution.py), no plan change
            text = f"slow communication: {attribution.get('reason', '')}"
        if d.get("action"):
            text += f"; {d['action']} at step {d.get('action_step', '?')}: {d.get('action_reason', '')}"
        return text
    return str(d.get("message", "")) or event.kind


def _layout(value: Any) -> str:
    if isinstance(value, dict):
        return f"dp={value.get('dp', '?')}·pp={value.get('pp', '?')}"
    return str(value or "?")


def event_step(event: JobEventRecord) -> int:
    """The step an event happened at (older records keep it in their data)."""
    if event.step:
        return event.step
    for name in ("at_step", "action_step", "step"):
        value = event.data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def event_generation(event: JobEventRecord) -> int:
    value = event.data.get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def read_events(etcd: Etcd, keys: Keys, job: str, *, limit: int = DEFAULT_EVENTS_LIMIT,
                      since_time: float = 0.0) -> list[JobEventRecord]:
    """The job's events after ``since_time``, oldest first, at most the newest ``limit``
    (capped at MAX_EVENTS_READ). Malformed values are logged and skipped."""
    out: list[JobEventRecord] = []
    for kv in await etcd.get_prefix(keys.job_events(job)):
        try:
            event = JobEventRecord.from_json(kv.value)
        except RecordError as exc:
            log.warning("skipping malformed job event at %s: %s", kv.key, exc)
            continue
        if event.time > since_time:
            out.append(event)
    out.sort(key=lambda e: e.time)
    limit = min(limit if limit > 0 else DEFAULT_EVENTS_LIMIT, MAX_EVENTS_READ)
    return out[-limit:]


def last_exception_line(text: str) -> str:
    """The last line of ``text`` (a worker's log tail) that names an exception, e.g.
    ``RuntimeError: Connection closed by peer [127.0.0.1]:1234``; "" if none. Pure."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if _EXC_LINE.match(line):
            return line[:MAX_ERROR_CHARS]
    return ""


def log_tail(path, *, start: int = 0, max_bytes: int = LAST_ERROR_SCAN_BYTES) -> str:
    """The last ``max_bytes`` of a log file from offset ``start`` on, as text ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(size - max_bytes, start, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def event_json(event: JobEventRecord) -> dict[str, Any]:
    """The event as the CLI's --json and the API carry it (message rendered)."""
    return {"time": event.time, "kind": event.kind, "step": event_step(event),
            "generation": event_generation(event), "message": describe(event), "action": event.action,
            "data": event.data}


def data_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)
