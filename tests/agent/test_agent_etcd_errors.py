"""Temporary versus permanent etcd errors in the agent and `tenax up`: a retry loop retries
``EtcdUnavailable`` only; a refusal (``EtcdError``) is logged with what was skipped and not
retried. The etcd client is faked here (unit tests): a real etcd refuses too rarely to test."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from agent.main import Agent, AgentSettings
from agent.progress import ProgressRelay
from agent.registration import Registration
from agent.supervisor import Supervisor, Worker
from agent.telemetry import NoGpuSource
from cli import local
from common.etcd import EtcdError, EtcdUnavailable
from protos.keys import Keys
from protos.records import JoinerRecord

pytestmark = pytest.mark.timeout(30)

KEYS = Keys()


class ScriptedEtcd:
    """Raises the scripted errors, in order, from every call it fakes; then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[str] = []
        self.puts: dict[str, str] = {}

    def _next(self, what: str) -> None:
        self.calls.append(what)
        if self.errors:
            raise self.errors.pop(0)

    async def grant_lease(self, ttl_s: int) -> int:
        self._next("grant")
        return 7

    async def put(self, key: str, value: str, *, lease: int | None = None) -> int:
        self._next(f"put {key}")
        self.puts[key] = value
        return 1

    async def revoke_lease(self, lease_id: int) -> None:
        pass

    async def refresh_lease(self, lease_id: int) -> int:
        return 5


def run(coro, timeout_s: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def registration(etcd: ScriptedEtcd) -> Registration:
    return Registration(etcd=etcd, keys=KEYS, node_id="n1", ttl_s=5, node_info=lambda: {"id": "n1"})


def test_registration_retries_unavailable_etcd_until_registered():
    etcd = ScriptedEtcd(EtcdUnavailable("down"), EtcdUnavailable("down"))

    async def scenario():
        reg = registration(etcd)
        reg.start()
        await asyncio.wait_for(reg.registered.wait(), 5)
        await reg.stop(revoke=False)
        return reg

    reg = run(scenario())
    assert etcd.calls.count("grant") == 3 and reg.refused is None and not reg.ended.is_set()


def test_a_refused_registration_is_not_retried_and_stops_the_agent(tmp_path, caplog):
    refusal = EtcdError("etcd refused lease grant: permission denied")
    etcd = ScriptedEtcd(refusal)
    settings = AgentSettings(etcd="http://127.0.0.1:1", node_id="n1", work_dir=tmp_path).validate()

    async def scenario():
        agent = Agent(settings, gpu_source=NoGpuSource())
        agent.registration = registration(etcd)
        agent.registration.start()
        with pytest.raises(EtcdError) as raised:
            await agent._registered()
        await asyncio.sleep(0.3)  # a retry would come within the first backoff (<= 0.1 s)
        return raised.value

    with caplog.at_level(logging.ERROR, logger="agent.registration"):
        raised = run(scenario())
    assert raised is refusal and etcd.calls == ["grant"]
    assert any("not retried" in r.getMessage() and "permission denied" in r.getMessage() for r in caplog.records)


def supervisor(etcd: ScriptedEtcd, tmp_path: Path) -> Supervisor:
    return Supervisor(etcd=etcd, keys=KEYS, node_id="n1", work_dir=tmp_path)


def worker(tmp_path: Path) -> Worker:
    return Worker(job="j1", rank=0, slot=0, generation=1, pid=123, proc=None, log_path=tmp_path / "log",
                  metrics_path=tmp_path / "metrics", started=time.time(), state="RUNNING")


def test_worker_status_is_retried_while_etcd_is_unavailable_and_skipped_when_refused(tmp_path, caplog):
    etcd = ScriptedEtcd(EtcdUnavailable("down"), EtcdUnavailable("down"))
    run(supervisor(etcd, tmp_path)._report(worker(tmp_path)))
    assert len(etcd.calls) == 3 and json.loads(etcd.puts[KEYS.job_worker("j1", 0)])["state"] == "RUNNING"

    refused = ScriptedEtcd(EtcdError("etcd refused put: request too large"))
    with caplog.at_level(logging.ERROR, logger="agent.supervisor"):
        run(supervisor(refused, tmp_path)._report(worker(tmp_path)), timeout_s=2)
    assert len(refused.calls) == 1 and not refused.puts
    assert any("skipped" in r.getMessage() and "rank 0" in r.getMessage() for r in caplog.records)


def test_joiner_record_is_written_once_when_etcd_refuses_it(tmp_path):
    record = JoinerRecord(growth_id="g2", node="n1", slot=1, state="FAILED", time=1.0)
    refused = ScriptedEtcd(EtcdError("refused"), EtcdError("refused"))
    run(supervisor(refused, tmp_path)._put_joiner("j1", record, tries=5), timeout_s=2)
    assert len(refused.calls) == 1

    flaky = ScriptedEtcd(*[EtcdUnavailable("down")] * 5)
    run(supervisor(flaky, tmp_path)._put_joiner("j1", record, tries=5))
    assert len(flaky.calls) == 5 and not flaky.puts  # bounded: the growth deadline covers a lost one


def test_progress_relay_skips_a_refused_write_and_keeps_one_etcd_could_not_take(tmp_path):
    path = tmp_path / "rank-0.metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 64, "step_time": 0.1}) + "\n")

    def relay(etcd: ScriptedEtcd) -> ProgressRelay:
        r = ProgressRelay(etcd=etcd, keys=KEYS, job="j1", rank=0, path=path, relay_steps=True)
        r._read_new_lines()
        return r

    unavailable = relay(ScriptedEtcd(EtcdUnavailable("down")))
    with pytest.raises(EtcdUnavailable):
        run(unavailable._publish(force=True))
    run(unavailable._publish(force=True))  # the retry writes the same step and its metrics
    assert set(unavailable.etcd.puts) == {KEYS.job_progress_rank("j1", 0), KEYS.job_metrics_batch("j1", 1)}

    refused = relay(ScriptedEtcd(EtcdError("refused"), EtcdError("refused")))
    run(refused._publish(force=True))  # both writes refused: logged and skipped, nothing raised
    run(refused._publish(force=True))  # nothing left to write: no retry of what was refused
    assert len(refused.etcd.calls) == 2 and not refused.etcd.puts and refused.writes == 0


def test_tenax_up_fails_at_once_when_etcd_refuses_the_node_read(monkeypatch):
    class RefusingEtcd:
        def __init__(self, *args, **kwargs):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

        async def get_prefix(self, prefix):
            raise EtcdError("etcd refused get_prefix: permission denied")

    monkeypatch.setattr(local, "Etcd", RefusingEtcd)
    with pytest.raises(local.ClusterError, match="permission denied"):
        local.registered_nodes("http://127.0.0.1:1")


def test_tenax_up_waits_while_etcd_is_unreachable():
    # nothing listens on port 1: unreachable is temporary, the caller keeps polling until its deadline
    assert local.registered_nodes("http://127.0.0.1:1") == set()
