"""Chaos requests: validation, rank resolution, the agent carrying them out on real
processes (SIGKILL, SIGSTOP, the slow control file), the CLI's argument checks,
and that the RPC is admin-only."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.chaos import ChaosExecutor, slow_control_file
from agent.rank_health import process_stopped
from controller.auth import Identity, authorize
from controller.chaos import rank_request, resolve_rank
from protos.chaos import ChaosRecord, validate_action
from cli.chaos import request_from_args
from cli.client import CliError
from controller.decisions import Slot, build_plan
from protos.keys import Keys
from tests.controller.test_health_loop import spec
from trainer.telemetry import SlowdownControl

KEYS = Keys()


def plan():
    return build_plan(job_id="j", spec=spec(), placement=[Slot(node=f"n{r // 2}", slot=r % 2) for r in range(4)],
                      store_address="127.0.0.1:1")


# ------------------------------------------------------------------ controller side
@pytest.mark.parametrize("action,kwargs,problem", [
    ("explode", {}, "action: must be one of"),
    ("kill", {"job": ""}, "job_id: required"),
    ("hang", {"rank": -1}, "rank: must be >= 0"),
    ("slow", {"factor": 0.5}, "factor: must be in [1, 100]"),
    ("slow", {"factor": float("nan")}, "factor"),
    ("kill-node", {"node": ""}, "node_id: required"),
])
def test_validate_action_names_the_field(action, kwargs, problem):
    args = {"job": "j", "rank": 0, "factor": 1.5, "node": "n0", **kwargs}
    assert problem in validate_action(action, **args)


def test_validate_action_accepts_good_requests():
    assert validate_action("slow", job="j", rank=2, factor=1.5, node="") == ""
    assert validate_action("kill-node", job="", rank=-1, factor=1.0, node="n1") == ""


def test_resolve_rank_uses_the_current_plan():
    p = plan()
    assert resolve_rank(p, "j", 3)[0] == "n1"
    node, why = resolve_rank(p, "j", 9)
    assert node is None and "ranks 0..3" in why
    assert resolve_rank(None, "j", 0)[0] is None


def test_record_round_trips_and_rejects_garbage():
    record = rank_request(action="slow", plan=plan(), job="j", rank=2, reason="test", now=5.0, factor=2.0)
    assert (record.node, record.generation) == ("n1", 1)
    assert ChaosRecord.from_json(record.to_json()) == record
    for bad in ("{", "[]", json.dumps({"id": "x", "action": "kill", "node": "n0", "job": "j", "rank": "one"}),
                json.dumps({"id": "x", "action": "nuke", "node": "n0"})):
        with pytest.raises(ValueError):
            ChaosRecord.from_json(bad)


def test_chaos_rpc_is_admin_only():
    method = "/tenax.v1.ChaosService/Inject"
    assert authorize(Identity(name="ops", role="admin", via="token"), method).allowed
    for role in ("viewer", "submitter"):
        assert not authorize(Identity(name="u", role=role, via="token"), method).allowed
    assert not authorize(None, method).allowed


def test_cli_arguments():
    ns = lambda **kw: argparse.Namespace(**{"node": "", "job": "", "rank": None, "factor": 1.5, **kw})
    assert request_from_args(ns(action="slow", job="j", rank=1, factor=2.0)).factor == 2.0
    assert request_from_args(ns(action="kill-node", node="n1")).node_id == "n1"
    for bad in (ns(action="kill", job="j"), ns(action="kill-node"), ns(action="hang", job="j", rank=0, node="n"),
                ns(action="slow", job="j", rank=0, factor=0.2)):
        with pytest.raises(CliError):
            request_from_args(bad)


# ------------------------------------------------------------------ agent side
class FakeEtcd:
    def __init__(self):
        self.deleted = []

    async def delete(self, key):
        self.deleted.append(key)
        return True


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def executor(tmp_path: Path, proc, generation=1, crash=None):
    worker = SimpleNamespace(pid=proc.pid, alive=True, generation=generation)
    supervisor = SimpleNamespace(workers={("j", 2): worker}, work_dir=tmp_path, killed_all=[],
                                 kill_all_now=lambda: supervisor.killed_all.append(True))
    return ChaosExecutor(etcd=FakeEtcd(), keys=KEYS, node_id="n1", supervisor=supervisor,
                         crash=crash or (lambda: None)), supervisor


def request(action, *, generation=1, factor=1.0, rank=2, rid="r1"):
    return ChaosRecord(id=rid, action=action, node="n1", job="j" if action != "kill-node" else "", rank=rank,
                       generation=generation, factor=factor, time=1.0).to_json()


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_agent_hang_stops_the_worker_then_kill_kills_it(tmp_path, sleeper):
    ex, _ = executor(tmp_path, sleeper)
    outcome = asyncio.run(ex.handle(KEYS.chaos_request("n1", "r1"), request("hang")))
    assert "SIGSTOP" in outcome
    assert wait_for(lambda: process_stopped(sleeper.pid)), "not stopped"
    assert asyncio.run(ex.handle(KEYS.chaos_request("n1", "r1"), request("hang"))) == "duplicate"
    assert "SIGKILL" in asyncio.run(ex.handle(KEYS.chaos_request("n1", "r2"), request("kill", rid="r2")))
    assert sleeper.wait(5) == -signal.SIGKILL
    assert ex.etcd.deleted == [KEYS.chaos_request("n1", "r1"), KEYS.chaos_request("n1", "r2")]


def test_agent_ignores_requests_for_other_ranks_or_older_generations(tmp_path, sleeper):
    ex, _ = executor(tmp_path, sleeper, generation=3)
    assert "no live worker" in asyncio.run(ex.handle("k1", request("kill", rank=0, rid="a")))
    assert "generation 3" in asyncio.run(ex.handle("k2", request("kill", generation=2, rid="b")))
    assert "malformed" == asyncio.run(ex.handle("k3", "{oops"))
    assert sleeper.poll() is None and not process_stopped(sleeper.pid)
    assert ex.etcd.deleted == ["k1", "k2", "k3"]


def test_agent_slow_writes_the_control_file_the_worker_reads(tmp_path, sleeper):
    ex, _ = executor(tmp_path, sleeper)
    asyncio.run(ex.handle("k", request("slow", factor=1.5)))
    run_dir = tmp_path / "jobs" / "j" / "run"
    assert json.loads(slow_control_file(run_dir, 2).read_text()) == {"slow_factor": 1.5}
    control = SlowdownControl(str(run_dir), 2)
    assert control.current() == 1.5
    asyncio.run(ex.handle("k", request("slow", factor=1.0, rid="r2")))
    assert control.current() == 1.0
    assert SlowdownControl(str(run_dir), 0).current() == 1.0  # another rank: no file


def test_agent_kill_node_kills_workers_and_crashes_after_deleting_the_request(tmp_path, sleeper):
    crashed = []
    ex, supervisor = executor(tmp_path, sleeper, crash=lambda: crashed.append(True))
    asyncio.run(ex.handle("k", request("kill-node")))
    assert supervisor.killed_all == [True] and crashed == [True] and ex.etcd.deleted == ["k"]
