"""``tenax diagnose JOB [--generation G] [--out DIR]``: the Flight Recorder dumps taken when the
controller declared a hang (protos/flight.py), read from etcd, analysed (controller/flight.py)
and optionally written as PyTorch dump files (``DIR/fr_rank<R>``) for the standard analyzer:
``python -m torch.distributed.flight_recorder.fr_trace DIR`` (ranks that sent no dump, such as
a stopped one, are absent there too).

It reads etcd directly (an operator's tool, like ``tenax controller``): ``--etcd`` and ``--prefix``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sys
from pathlib import Path

from cli.controller import DEFAULT_ETCD
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from controller.flight import analyse
from protos import flight
from protos.keys import DEFAULT_PREFIX, Keys


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="Flight Recorder dumps of a job's hang: who is behind, in which collective")
    p.add_argument("job", help="job id")
    p.add_argument("--generation", type=int, default=None,
                   help="plan generation whose hang dumps to show (default: the newest with dumps)")
    p.add_argument("--out", default="", help="write the dumps as DIR/fr_rank<R> (PyTorch's format) here")
    p.add_argument("--json", action="store_true", help="print the finding as JSON")
    p.add_argument("--etcd", default=DEFAULT_ETCD, help=f"etcd endpoint (default {DEFAULT_ETCD})")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"etcd key prefix (default {DEFAULT_PREFIX})")
    p.set_defaults(func=run)


async def _read(endpoint: str, keys: Keys, job: str) -> list[flight.FlightDumpRecord]:
    async with Etcd(endpoint, timeout_s=5.0) as etcd:
        kvs = await etcd.get_prefix(keys.job_flights(job))
    records = []
    for kv in kvs:
        try:
            records.append(flight.FlightDumpRecord.from_json(kv.value))
        except ValueError as exc:
            print(f"tenax: skipping {kv.key}: {exc}", file=sys.stderr)
    return records


def run(args: argparse.Namespace) -> int:
    if args.generation is not None and args.generation < 1:
        print(f"tenax: --generation: must be >= 1, got {args.generation}", file=sys.stderr)
        return 2
    try:
        records = asyncio.run(asyncio.wait_for(_read(args.etcd, Keys(args.prefix), args.job), 20))
    except (EtcdError, EtcdUnavailable, OSError, asyncio.TimeoutError, ValueError) as exc:
        print(f"tenax: cannot read etcd at {args.etcd}: {exc!r}", file=sys.stderr)
        return 1
    generations = sorted({r.generation for r in records})
    if not generations:
        print(f"tenax: job {args.job} has no flight recorder dumps (no hang was declared, or they were pruned)",
              file=sys.stderr)
        return 1
    generation = generations[-1] if args.generation is None else args.generation
    chosen = [r for r in records if r.generation == generation]
    if not chosen:
        print(f"tenax: --generation: job {args.job} has dumps for generations {generations}, not {generation}",
              file=sys.stderr)
        return 1
    dumps: dict[int, dict] = {}
    missing: list[int] = []
    for record in chosen:
        dumps.update(record.decoded())
        missing.extend(record.missing)
    finding, reason = analyse(dumps, missing)
    if args.json:
        print(json.dumps({"job": args.job, "generation": generation, "finding": finding.to_dict()}, indent=1))
    else:
        print(f"job {args.job} generation {generation}: dumps from ranks {sorted(dumps)}, none from {sorted(set(missing))}")
        print(reason)
        for w in finding.waits:
            print(f"  rank {w.rank}: {w.op}" + (f" #{w.seq} group {w.group} {w.group_ranks}" if w.seq >= 0 else "")
                  + (f" peer {w.peer}" if w.peer >= 0 else "") + f" waits for {w.waiting_for} [{w.source}]")
            stack = (dumps[w.rank].get("tenax") or {}).get("python_stack") or []
            for frame in stack[-4:]:
                print(f"      {frame}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for rank, dump in dumps.items():
            flight.dump_file(out, rank).write_bytes(pickle.dumps(dump))
        print(f"dumps written to {out} (python -m torch.distributed.flight_recorder.fr_trace {out})")
    return 0
