"""The agent's side of a Flight Recorder dump request (agent/flight.py): it asks its live workers
of the job, waits for their files until the deadline, and publishes one record for the node;
a worker that does not answer (stopped) is listed as missing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed  # noqa: F401 - a worker has torch loaded; the first import alone takes seconds

from agent import flight as agent_flight
from protos import flight
from protos.chaos import FLIGHT_DUMP, ChaosRecord
from protos.keys import Keys
from trainer.flight import DumpResponder

KEYS = Keys("/t")


@dataclass
class W:
    alive: bool = True
    pid: int = 0


class Supervisor:
    def __init__(self, work_dir: Path, ranks):
        self.work_dir = work_dir
        self.workers = {("job-a", r): W() for r in ranks}
        self.workers[("job-b", 9)] = W()


class FakeEtcd:
    def __init__(self):
        self.puts = {}

    async def put(self, key, value, **_):
        self.puts[key] = value
        return 1


def test_agent_collects_answering_ranks_lists_the_silent_one_and_publishes(tmp_path):
    sup = Supervisor(tmp_path, [0, 5])
    run_dir = tmp_path / "jobs" / "job-a" / "run"
    responder = DumpResponder(run_dir, 0).start()  # rank 0 answers; rank 5 is "stopped"
    etcd = FakeEtcd()
    record = ChaosRecord(id="000000000000001-ab", action=FLIGHT_DUMP, node="n0", job="job-a", rank=0,
                         generation=3, time=1.0)
    try:
        outcome = asyncio.run(asyncio.wait_for(agent_flight.answer(etcd, KEYS, "n0", sup, record), 10))
    finally:
        responder.stop()
    assert "missing [5]" in outcome
    out = flight.FlightDumpRecord.from_json(etcd.puts[KEYS.job_flight("job-a", 3, "n0")])
    assert out.id == record.id and out.missing == [5] and sorted(out.dumps) == ["0"]
    dump = out.decoded()[0]
    assert dump["tenax"]["rank"] == 0 and dump["tenax"]["python_stack"]
    # the full dump stays on the node, in PyTorch's file naming
    assert flight.dump_file(flight.dump_dir(run_dir, record.id), 0).exists()


def test_a_stopped_worker_is_missing_at_once_not_after_the_deadline(tmp_path):
    """A SIGSTOPped rank cannot write its dump: the agent publishes without waiting the
    deadline for it (the kill of the hung rank waits on this record)."""
    sup = Supervisor(tmp_path, [0, 5])
    run_dir = tmp_path / "jobs" / "job-a" / "run"
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        sup.workers[("job-a", 5)] = W(pid=stopped.pid)
        responder = DumpResponder(run_dir, 0).start()
        etcd = FakeEtcd()
        record = ChaosRecord(id="000000000000002-ab", action=FLIGHT_DUMP, node="n0", job="job-a", rank=0,
                             generation=3, time=1.0)
        began = time.monotonic()
        try:
            outcome = asyncio.run(asyncio.wait_for(agent_flight.answer(etcd, KEYS, "n0", sup, record), 10))
        finally:
            responder.stop()
        took = time.monotonic() - began
    finally:
        stopped.kill()
        stopped.wait(10)
    assert "missing [5]" in outcome
    out = flight.FlightDumpRecord.from_json(etcd.puts[KEYS.job_flight("job-a", 3, "n0")])
    assert out.missing == [5] and sorted(out.dumps) == ["0"]  # the live rank's dump is still waited for
    assert took < flight.DUMP_DEADLINE_S - 0.5, f"waited {took:.2f} s for a stopped rank"


def test_agent_keeps_only_the_newest_dump_directories(tmp_path):
    for i in range(flight.KEEP_DUMPS + 3):
        (flight.flight_dir(tmp_path) / f"{i:015d}-x").mkdir(parents=True)
    agent_flight.prune(tmp_path)
    left = sorted(p.name for p in flight.flight_dir(tmp_path).iterdir())
    assert left == [f"{i:015d}-x" for i in range(3, flight.KEEP_DUMPS + 3)]


def test_step_line_communication_times_become_per_kind_gauges_and_go_with_the_job():
    from agent import metrics

    agent_flight.export_comm("job-m", 2, {"kind": {"gradient all-reduce": 0.25, "pipeline receive": 0.5},
                                          "peer": {"pipeline receive|1": 0.5}})
    gauge = metrics.RANK_COMM_SECONDS
    assert gauge.labels("job-m", "2", "pipeline receive")._value.get() == 0.5
    assert gauge.labels("job-m", "2", "gradient all-reduce")._value.get() == 0.25
    agent_flight.forget_comm("job-m", 2)
    metrics_text = __import__("prometheus_client").generate_latest(metrics.REGISTRY).decode()
    assert 'job="job-m"' not in metrics_text
