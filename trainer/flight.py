"""The worker's side of PyTorch's Flight Recorder (see protos/flight.py for the protocol).

``enable`` turns the recorder on for every process group this process creates (it must
run before the first one: torch reads ``TORCH_FR_BUFFER_SIZE`` when a group is built).
``DumpResponder`` is a daemon thread that writes a dump when the agent asks for one.
It runs beside a main thread blocked in a collective or a pipeline receive (those waits
release the GIL), which is exactly the state a hang dump must capture. A SIGSTOPped
process cannot answer: its peers' dumps name it.

The dump is PyTorch's own (``torch._C._distributed_c10d._dump_fr_trace_json``, the format of
``torch.distributed.flight_recorder``) with one extra key, ``"tenax"``: the global rank,
the main thread's Python stack and what it waits in (the ``what`` of the innermost
``wait(work, what)`` frame, and the peer of a pipeline send/receive), because the gloo
recorder of torch 2.13 records collectives but not point-to-point operations.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from protos import flight, launch

log = logging.getLogger("tenax.trainer.flight")

TORCH_BUFFER_ENV = "TORCH_FR_BUFFER_SIZE"
"""torch's own variable (distributed_c10d.py and the C++ recorder read it)."""

_PEER_LOCALS = ("src", "dst", "peer", "prev", "nxt")


def buffer_entries(env: Mapping[str, str]) -> int:
    """``TENAX_FLIGHT_RECORDER_ENTRIES`` (default DEFAULT_BUFFER_ENTRIES); ValueError naming it."""
    raw = env.get(launch.FLIGHT_RECORDER_ENTRIES, "").strip()
    if not raw:
        return flight.DEFAULT_BUFFER_ENTRIES
    if not raw.isdigit():
        raise ValueError(f"{launch.FLIGHT_RECORDER_ENTRIES}: must be an integer >= 0, got {raw!r}")
    return int(raw)


def enable(env: Mapping[str, str] | None = None) -> int:
    """Size torch's recorder for this process (before any process group); returns the size.
    An explicit ``TORCH_FR_BUFFER_SIZE`` in the environment wins (an operator's override)."""
    env = os.environ if env is None else env
    entries = buffer_entries(env)
    os.environ.setdefault(TORCH_BUFFER_ENV, str(entries))
    return int(os.environ[TORCH_BUFFER_ENV] or 0)


def main_thread_stack() -> tuple[list[str], dict[str, Any]]:
    """(the main thread's Python stack, innermost last, as ``file:line function``; what it waits in)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return [], {}
    stack = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)]
    waiting: dict[str, Any] = {}
    f = frame
    while f is not None:  # innermost first
        local = f.f_locals
        if "what" not in waiting and isinstance(local.get("what"), str) and "wait" in f.f_code.co_name:
            waiting["what"] = local["what"]
            waiting["where"] = f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
        elif "what" in waiting:
            peers = {k: local[k] for k in _PEER_LOCALS if isinstance(local.get(k), int) and not isinstance(local.get(k), bool)}
            if peers:
                waiting["peer"] = next(iter(peers.values()))
                waiting["caller"] = f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                break
        f = f.f_back
    return stack, waiting


def take_dump(rank: int) -> dict[str, Any]:
    """This process's Flight Recorder dump (torch's dict) plus the ``tenax`` entry."""
    stack, waiting = main_thread_stack()
    try:
        import torch.distributed as dist
        from torch._C._distributed_c10d import _dump_fr_trace_json

        # the JSON form: unpickling the binary one imports torch._dynamo lazily (tens of seconds)
        dump = json.loads(_dump_fr_trace_json(True, True))
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            _fill_group_ranks(dump)
    except Exception as exc:  # noqa: BLE001 - a dump without the recorder still carries the stack
        dump = {"version": "", "entries": [], "pg_config": {}, "pg_status": {}, "error": repr(exc)}
    dump["tenax"] = {"rank": rank, "time": time.time(), "python_stack": stack, "waiting_in": waiting,
                     "pid": os.getpid()}
    return dump


def _fill_group_ranks(dump: dict[str, Any]) -> None:
    """torch 2.13's gloo recorder leaves ``pg_config`` without the groups (``{'': ranks '[]'}``):
    fill in every live group's global ranks, in the recorder's own format, so that both our
    analysis and the standard analyzer see which ranks a collective waits for."""
    from torch.distributed import distributed_c10d as c10d

    config = dump.setdefault("pg_config", {})
    for group, name in list(c10d._world.pg_names.items()):
        try:
            ranks = c10d.get_process_group_ranks(group)
        except Exception:  # noqa: BLE001 - a group being torn down
            continue
        known = config.get(name)
        if not (isinstance(known, dict) and known.get("ranks") not in (None, "", "[]")):
            config[name] = {"name": name, "desc": getattr(group, "group_desc", ""), "ranks": str(list(ranks))}


class DumpResponder:
    """Daemon thread: on a new request id in ``<run dir>/flight/request``, write this rank's dump."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.answered: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tenax-flight", daemon=True)

    def start(self) -> "DumpResponder":
        # a request that predates this process is not for it (a restarted worker)
        current = self._request_id()
        if current:
            self.answered.add(current)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _request_id(self) -> str:
        try:
            data = json.loads(flight.request_file(self.run_dir).read_text())
        except (OSError, ValueError):
            return ""
        return data.get("id", "") if isinstance(data, dict) and isinstance(data.get("id"), str) else ""

    def _run(self) -> None:
        while not self._stop.wait(flight.POLL_S):
            request = self._request_id()
            if not request or request in self.answered or "/" in request or request.startswith("."):
                continue
            self.answered.add(request)
            try:
                self.write(request)
            except Exception:  # noqa: BLE001 - a failed dump must never end training
                log.exception("flight recorder dump %s failed", request)

    def write(self, request: str) -> Path:
        dump = take_dump(self.rank)
        directory = flight.dump_dir(self.run_dir, request)
        directory.mkdir(parents=True, exist_ok=True)
        path = flight.dump_file(directory, int(dump["tenax"]["rank"]))
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(pickle.dumps(dump))
        os.replace(tmp, path)
        return path


def start(run_dir: str, rank: int | None) -> DumpResponder | None:
    """Enable the recorder and, with a run dir, answer dump requests. Call before the first process group."""
    enable()
    if not run_dir or rank is None:
        return None
    return DumpResponder(run_dir, rank).start()
