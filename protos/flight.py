"""Flight Recorder dumps on a hang decision: the files and records every side shares.

PyTorch's Flight Recorder (``TORCH_FR_BUFFER_SIZE`` entries per process, its own ring
buffer and dump format) records the collectives of every process group. When the
controller decides a hang it asks every node of the job for a dump (a ``flight-dump``
request on the chaos path, protos/chaos.py), *before* the culprit is killed:

1. the agent writes ``<run dir>/flight/request`` = ``{"id": ..., "time": ...}``;
2. each worker's dump thread (trainer/flight.py) sees a new id within ``POLL_S`` and
   writes ``<run dir>/flight/<id>/fr_rank<R>``: PyTorch's pickled dump, plus a
   ``"tenax"`` entry (rank, the main thread's Python stack, what it waits in). The file
   names follow the standard analyzer (``python -m torch.distributed.flight_recorder.fr_trace
   DIR``, prefix ``fr_rank``). A SIGSTOPped rank writes nothing: the waiting ranks'
   dumps are what name it;
3. the agent waits until every local rank answered (a stopped one cannot: it is missing at
   once) or ``DUMP_DEADLINE_S`` passed, and
   writes a FlightDumpRecord at ``Keys.job_flight(job, generation, node)``;
4. the controller (controller/flight.py) waits ``COLLECT_WAIT_S`` for the nodes'
   records, analyses them, writes the finding into the hang event, then kills.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


DEFAULT_BUFFER_ENTRIES = 2000
"""Flight Recorder ring size (entries per process) when ``TENAX_FLIGHT_RECORDER_ENTRIES`` is unset."""

POLL_S = 0.1
"""Seconds between two looks of a worker's dump thread at the request file."""

DUMP_DEADLINE_S = 2.0
"""Seconds an agent waits for its ranks' dump files after writing the request."""

COLLECT_WAIT_S = DUMP_DEADLINE_S + 2.0
"""Seconds the controller waits for the nodes' records after sending the requests."""

MAX_ENTRIES_SHIPPED = 64
"""Newest Flight Recorder entries per rank an agent puts into etcd (the full dump stays on its disk)."""

KEEP_DUMPS = 5
"""Dump directories an agent keeps per job (older ones are removed); records kept per job in etcd."""

DUMP_PREFIX = "fr_rank"
"""File name prefix of a rank's dump (the standard analyzer's ``--prefix``)."""


def flight_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "flight"


def request_file(run_dir: str | Path) -> Path:
    return flight_dir(run_dir) / "request"


def dump_dir(run_dir: str | Path, request_id: str) -> Path:
    return flight_dir(run_dir) / request_id


def dump_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"{DUMP_PREFIX}{rank}"


def pack(value: Any) -> str:
    """JSON -> zlib -> base64 text (a dump fits an etcd value)."""
    return base64.b64encode(zlib.compress(json.dumps(value, default=str).encode(), 6)).decode()


def unpack(text: str) -> Any:
    """Inverse of ``pack``; ValueError on anything malformed."""
    try:
        return json.loads(zlib.decompress(base64.b64decode(text.encode(), validate=True)))
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"flight dump is malformed: {exc}") from exc


@dataclass(kw_only=True)
class FlightDumpRecord:
    """One node's answer to a dump request, at ``Keys.job_flight(job, generation, node)``."""

    id: str
    """The request id (controller/chaos.new_request_id)."""
    job: str
    generation: int
    node: str
    time: float
    """Unix seconds when the agent wrote it."""
    dumps: dict[str, str] = field(default_factory=dict)
    """Global rank (text) -> ``pack(dump)``; the dump is PyTorch's dump dict (entries trimmed to
    ``MAX_ENTRIES_SHIPPED``) plus ``"tenax"``."""
    missing: list[int] = field(default_factory=list)
    """Ranks of this node that wrote no dump before the deadline (a stopped process)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "FlightDumpRecord":
        try:
            data = json.loads(raw)
            known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
            record = cls(**known)
            record.generation = int(record.generation)
            record.missing = [int(r) for r in record.missing]
            if not isinstance(record.dumps, dict):
                raise TypeError("dumps must be an object")
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"flight dump record is malformed: {exc}") from exc
        return record

    def decoded(self) -> dict[int, dict[str, Any]]:
        """rank -> dump dict; a malformed dump is left out."""
        out: dict[int, dict[str, Any]] = {}
        for rank, text in self.dumps.items():
            try:
                dump = unpack(text)
            except ValueError:
                continue
            if isinstance(dump, dict) and str(rank).isdigit():
                out[int(rank)] = dump
        return out
