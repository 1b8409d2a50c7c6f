"""Issue #18, the rest of findings 3 and 10, and a per-worker memory limit, through the real path:

* every generation of every job has an unguessable (128-bit) component in its rendezvous store
  prefix; a client that reaches the store but never read the plan cannot see the job's keys;
* workers get no etcd endpoint, certificate, key or CA in their environment (the agent relays the
  plans to a file), with etcd on TLS with client certificates, and still recover from kill -9;
* a worker past its host memory limit is killed and its job FAILS with that reason, not re-planned.

Real etcd (TLS, client certificates), controller, agent and trainer workers; the decisions' units too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import grpc
import psutil
import pytest
import torch.distributed as dist

from agent.decisions import GB, memory_limit_bytes, memory_verdict
from common.embedded_etcd import EtcdServerTls, start_etcd
from common.etcd import Etcd, EtcdTls
from common.layout import public_store_prefix
from common.spec import JobSpec, SpecError
from controller.convert import spec_dict_to_proto
from controller.recovery_decisions import Failure, fail_permanently
from controller.tls import ensure_dev_pki
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.plan import Plan, WorkerAssignment
from protos.records import WorkerStatusRecord
from tests.conftest import REPO, run_async
from tests.e2e.test_e2e_cluster import job_file, job_json, local_cluster, submit
from trainer.abort import JOINED_KEY

KEYS = Keys()


# ------------------------------------------------------------------ decisions (pure)
def test_the_smaller_memory_limit_applies_and_zero_means_none():
    assert memory_limit_bytes(0.0, 0.0) is None
    assert memory_limit_bytes(2.0, 0.0) == memory_limit_bytes(0.0, 2.0) == int(2 * GB)
    assert memory_limit_bytes(2.0, 1.5) == memory_limit_bytes(1.5, 2.0) == int(1.5 * GB)
    assert memory_verdict(int(1.5 * GB), None) is None
    assert memory_verdict(int(1.5 * GB), int(1.5 * GB)) is None
    assert memory_verdict(int(2.25 * GB), int(1.5 * GB)) == "host memory limit exceeded: 2.25 GB > 1.50 GB"


def test_the_spec_memory_limit_is_validated():
    base = {"resources": {"workers": 1, "host_memory_gb": 2.5}}
    assert JobSpec.from_dict(base).resources.host_memory_gb == 2.5
    for bad, message in ((-1, "must be >= 0"), (1e9, "must be <= 16384"), ("lots", "must be a number"),
                         (float("nan"), "finite")):
        with pytest.raises(SpecError, match=rf"resources\.host_memory_gb.*{message}"):
            JobSpec.from_dict({"resources": {"workers": 1, "host_memory_gb": bad}})


def _plan() -> Plan:
    return Plan(job_id="j", generation=1, workers=tuple(
        WorkerAssignment(rank=r, node="n", slot=r, dp_rank=r, pp_rank=0) for r in range(2)), dp=2, pp=1,
        zero_stage=0, layer_partition=(0, 2), sample_shares=(2, 2), store_address="h:1", store_prefix="j/g1/s/")


def test_a_permanent_failure_fails_the_job_and_any_other_is_recovered():
    failure = Failure(cause="worker-failed", lost_ranks=frozenset({1}), lost_nodes=frozenset(), failed_at=1.0,
                      description="rank 1 on n killed (signal SIGKILL)")
    cause = "host memory limit exceeded: 2.00 GB > 1.00 GB"
    ok = WorkerStatusRecord(rank=0, node="n", state="RUNNING", slot=0, generation=1)
    hung = WorkerStatusRecord(rank=1, node="n", state="KILLED", slot=1, generation=1, signal="SIGKILL", cause="hang")
    big = WorkerStatusRecord(rank=1, node="n", state="KILLED", slot=1, generation=1, signal="SIGKILL", cause=cause,
                             permanent=True)
    assert fail_permanently(_plan(), failure, {0: ok, 1: hung}) is None
    message = fail_permanently(_plan(), failure, {0: ok, 1: big})
    assert message is not None and message.startswith(f"rank 1 on n: {cause}") and "not recovered" in message


# ------------------------------------------------------------------ a cluster with etcd on TLS
def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def _controller_address(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("controller"):
                return json.loads(line)["controller"]
    return None


@contextlib.contextmanager
def tls_cluster(tmp_path: Path, *, slots: int = 4):
    """etcd with TLS and client certificates, one controller and one agent that use them."""
    pki = ensure_dev_pki(tmp_path / "pki")
    agent_id, controller_id = pki.clients["agent"], pki.clients["controller"]
    etcd = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log", tls=EtcdServerTls(
        cert_file=pki.server.cert_file, key_file=pki.server.key_file, ca_file=pki.ca_file,
        client_cert_file=agent_id.cert_file, client_key_file=agent_id.key_file))
    procs: list[subprocess.Popen] = []
    try:
        cli = [sys.executable, "-m", "cli.main"]
        procs.append(_spawn([*cli, "controller", "--etcd", etcd.url, "--etcd-ca", pki.ca_file,
                             "--etcd-cert", controller_id.cert_file, "--etcd-key", controller_id.key_file,
                             "--listen", "127.0.0.1:0", "--metrics-port", "0", "--tls", "plaintext", "--no-auth",
                             "--lease-ttl", "3"], tmp_path / "controller.out"))
        procs.append(_spawn([*cli, "agent", "--etcd", etcd.url, "--etcd-ca", pki.ca_file,
                             "--etcd-cert", agent_id.cert_file, "--etcd-key", agent_id.key_file, "--node-id", "n1",
                             "--slots", str(slots), "--lease-ttl", "3", "--kill-grace", "2", "--http", "127.0.0.1:0",
                             "--work-dir", str(tmp_path / "agent")], tmp_path / "agent.log"))
        address = _wait(lambda: _controller_address(tmp_path / "controller.out"), 60, "the controller's address")
        info = {"controller": address, "controllers": [address], "security": None, "etcd": etcd.url,
                "tls": EtcdTls(ca_file=pki.ca_file, cert_file=agent_id.cert_file, key_file=agent_id.key_file),
                "secrets": [pki.ca_file, agent_id.cert_file, agent_id.key_file, controller_id.key_file],
                "agent": procs[-1], "work": tmp_path / "agent"}

        def node_ready() -> bool:
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as channel:
                nodes = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5).nodes
                return any(n.id == "n1" and n.state == pb.READY for n in nodes)
            return False

        _wait(node_ready, 60, "the agent to register")
        yield info
    finally:
        for proc in procs:
            for child in _children(proc.pid):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        etcd.kill()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _submit(info: dict, spec: dict) -> str:
    with grpc.insecure_channel(info["controller"]) as channel:
        job = pb_grpc.JobServiceStub(channel).SubmitJob(pb.SubmitJobRequest(spec=spec_dict_to_proto(spec)),
                                                        timeout=30)
    return job.id


def _etcd_get(info: dict, key: str) -> str | None:
    async def get():
        async with Etcd(info["etcd"], tls=info["tls"]) as etcd:
            kv = await etcd.get(key)
            return kv.value if kv is not None else None
    return run_async(get(), 30)


def _plan_of(info: dict, job_id: str) -> Plan:
    return Plan.from_json(_etcd_get(info, KEYS.job_plan(job_id)))


def _spec(name: str, *, steps: int) -> dict:
    return {"name": name, "seed": 3, "steps": steps, "global_batch_size": 4, "micro_batch_size": 2,
            "model": {"layers": 2, "d_model": 32, "heads": 2, "vocab_size": 64, "seq_len": 16, "dropout": 0.0},
            "data": {"kind": "synthetic", "num_samples": 4096}, "parallelism": {"dp": 2, "pp": 1, "zero_stage": 0},
            "elastic": {"min_workers": 1, "snapshot_every": "1"}, "resources": {"workers": 2, "device": "cpu"}}


def _until_phase(info: dict, job_id: str, phases: set[str], timeout_s: float = 120, step: int = 0) -> dict:
    def reached():
        job = job_json(info, job_id)
        return job if job["phase"] in phases and job["step"] >= step else None
    return _wait(reached, timeout_s, f"job {job_id} in {phases} past step {step}", interval_s=0.3)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_store_keys_need_the_plan_secret_and_workers_hold_no_etcd_credentials(tmp_path):
    with tls_cluster(tmp_path) as info:
        first, second = _submit(info, _spec("store-a", steps=400)), _submit(info, _spec("store-b", steps=400))
        for job_id in (first, second):
            _until_phase(info, job_id, {"RUNNING"}, step=2)
        plans = {job_id: _plan_of(info, job_id) for job_id in (first, second)}
        for job_id, plan in plans.items():
            assert re.fullmatch(rf"{job_id}/g1/[0-9a-f]{{32}}/", plan.store_prefix), plan.store_prefix
            with grpc.insecure_channel(info["controller"]) as channel:  # viewers see it without the secret
                job = pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
            assert job.status.generation == 1 and public_store_prefix(plan.store_prefix) == f"{job_id}/g1/"
        assert plans[first].store_prefix.split("/")[2] != plans[second].store_prefix.split("/")[2]

        # the store answers anyone who reaches it, but keys are named only by those who know the prefix
        plan = plans[first]
        host, _, port = plan.store_address.rpartition(":")
        client = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                               timeout=timedelta(seconds=10))
        joined = [f"{JOINED_KEY}{w.rank}" for w in plan.workers]
        assert dist.PrefixStore(plan.store_prefix, client).check(joined)  # the workers' keys are there
        for guess in (public_store_prefix(plan.store_prefix), f"{first}/", "", f"{first}/g1/0/"):
            assert not dist.PrefixStore(guess, client).check(joined[:1]), guess
            assert not client.check([guess + key for key in joined]), guess

        # finding 10: no etcd endpoint, certificate, key or CA in any worker's environment
        workers = [p for p in _children(info["agent"].pid) if "trainer.worker" in " ".join(p.cmdline())]
        assert len(workers) == 4, [p.cmdline() for p in workers]
        for proc in workers:
            env = _environ(proc.pid)
            assert env.get("TENAX_PLAN_FILE", "").endswith("plan.json")
            leaked = {name: value for name, value in env.items() if "ETCD" in name.upper()
                      or info["etcd"].split("//")[1] in value or any(secret in value for secret in info["secrets"])}
            assert leaked == {}, leaked

        # and the job still recovers from kill -9 (its survivors read the new plan from the agent's file)
        victim = next(w for w in job_json(info, first)["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        _until_phase(info, first, {"RUNNING", "SUCCEEDED"}, timeout_s=90)
        g2 = _wait(lambda: (p := _plan_of(info, first)).generation >= 2 and p, 60, "plan generation 2")
        assert re.fullmatch(rf"{first}/g2/[0-9a-f]{{32}}/", g2.store_prefix)
        assert g2.store_prefix.split("/")[2] != plan.store_prefix.split("/")[2]

        def recovered():
            with grpc.insecure_channel(info["controller"]) as channel:
                job = pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(job_id=first), timeout=10)
            done = [r for r in job.status.recoveries if r.total_s > 0]
            return done[0] if done and job.status.phase == pb.RUNNING and job.status.generation >= 2 else None

        record = _wait(recovered, 90, "the recovery to complete")
        print(f"recovery with etcd TLS, plans relayed by the agent: total {record.total_s:.3f} s, "
              f"workers stalled {record.worker_total_s:.3f} s, plan {record.plan_s:.3f} s")
        assert record.cause == "worker-failed" and record.steps_lost <= 1


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_worker_past_its_memory_limit_is_killed_and_the_job_fails_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TENAX_FAULT", "rank=0,step=3,kind=alloc,mb=1500")  # every worker of the agent inherits it
    with local_cluster(tmp_path, agents=1, slots=2, agent_args=["--worker-memory-limit-gb=8"]) as info:
        folder = tmp_path / "job"
        folder.mkdir()
        spec = job_file(folder, name="memory", steps=200, global_batch_size=4, micro_batch_size=2,
                        model={"arch": "gpt", "layers": 2, "d_model": 16, "heads": 2, "vocab_size": 64,
                               "seq_len": 8, "dropout": 0.0},
                        parallelism={"dp": 1, "pp": 1, "zero_stage": 0}, elastic={"min_workers": 1},
                        resources={"workers": 1, "device": "cpu", "host_memory_gb": 1.2},
                        data={"kind": "synthetic", "num_samples": 1024})
        job_id = submit(info, spec)
        job = _until_phase(info, job_id, {"FAILED", "SUCCEEDED"}, timeout_s=150)
        assert job["phase"] == "FAILED", job
        assert re.search(r"rank 0 on node-0: host memory limit exceeded: \d+\.\d\d GB > 1\.20 GB", job["message"]), job
        assert "not recovered" in job["message"] and job["generation"] == 1, job  # never re-planned elsewhere
        assert job["step"] >= 3, job  # killed for the fault's allocation (at step 3), not at start
