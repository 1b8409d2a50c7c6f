"""End to end: `tenax up --detach`, real etcd, controller(s), agents and trainer workers.

Every test starts its own cluster in a temp state dir with ephemeral ports and
kills everything it started (``tenax down``, then SIGKILL to any survivor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from common.embedded_etcd import start_etcd
from cli.local import controller_channel, local_cluster_state
from common.etcd import Etcd
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.records import LeaderRecord
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TTL_S = 3
"""Lease TTL of the test clusters (seconds)."""
KEYS = Keys()


# ------------------------------------------------------------------ helpers
def tenax(*argv: str, home: Path, timeout_s: float = 60, check: bool = True,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TENAX_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("TENAX_CONTROLLER", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"tenax {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@contextlib.contextmanager
def local_cluster(tmp_path: Path, *, agents: int = 2, slots: int | None = 2, controllers: int = 1, etcd: str = "",
                  controller_args: Sequence[str] = (), agent_args: Sequence[str] = (), lease_ttl_s: int = TTL_S):
    """`tenax up --detach`; yields its JSON; always `tenax down` and SIGKILLs survivors.
    ``controller_args``: extra `tenax controller` flags (``--controller-arg``);
    ``agent_args``: extra flags for every agent (``--agent-arg``); ``lease_ttl_s``: node and
    leader leases (seconds)."""
    home = tmp_path / "home"
    args = ["up", "--detach", "--agents", str(agents), *(["--slots", str(slots)] if slots is not None else []),
            "--controllers", str(controllers),
            "--lease-ttl", str(lease_ttl_s), "--timeout", "60", "--agent-arg=--kill-grace=2",
            *(f"--agent-arg={a}" for a in agent_args)]
    if etcd:
        args += ["--etcd", etcd]
    args += [f"--controller-arg={flag}" for flag in controller_args]
    up = tenax(*args, home=home, timeout_s=90)
    info = json.loads(up.stdout.strip().splitlines()[-1])
    info["home"] = home
    info["security"] = (local_cluster_state(home / "local") or {}).get("security")  # TLS + admin token, if any
    seen: set[int] = set(info["pids"].values())
    try:
        yield info
    finally:
        for pid in list(seen):
            seen.update(p.pid for p in _descendants(pid))
        tenax("down", home=home, timeout_s=60, check=False)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def job_file(tmp_path: Path, **overrides) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "tiny-gpt.yaml").read_text())
    spec.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(info: dict, path: Path) -> str:
    out = tenax("submit", str(path), "--controller", info["controller"], home=info["home"])
    return out.stdout.split()[1]  # "job <id> submitted"


class Unanswered(RuntimeError):
    """No controller replica answered (temporary during failover or an etcd restart)."""


def job_json(info: dict, job_id: str) -> dict:
    """GetJob over gRPC (cheaper than a CLI process per poll), from the first replica that answers."""
    last: Exception | None = None
    for address in info["controllers"]:
        try:
            with controller_channel(address, info["security"]) as channel:
                job = pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
        except grpc.RpcError as exc:
            last = exc
            continue
        st = job.status
        return {"id": job.id, "phase": pb.JobPhase.Name(st.phase), "message": st.message, "step": st.step,
                "generation": st.generation,
                "steps": job.spec.steps,
                "workers": [{"rank": w.rank, "node": w.node, "slot": w.slot, "pid": w.pid, "state": w.state}
                            for w in st.workers]}
    raise Unanswered(f"no controller answered GetJob: {last!r}")


def nodes(info: dict, address: str | None = None) -> dict[str, pb.NodeInfo]:
    with controller_channel(address or info["controller"], info["security"]) as channel:
        reply = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
    return {n.id: n for n in reply.nodes}


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (grpc.RpcError, subprocess.SubprocessError, ValueError, Unanswered) as exc:
            last = exc
            last_value = None
        else:
            last_value = last
        if last_value:
            return last_value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r:.500})")


def wait_job_step(info: dict, job_id: str, step: int, timeout_s: float = 90) -> dict:
    def reached():
        job = job_json(info, job_id)
        assert job["phase"] not in ("FAILED", "CANCELLED"), job
        return job if job["step"] >= step else None

    return wait_until(reached, timeout_s, f"job {job_id} at step {step}", interval_s=0.3)


def wait_job_done(info: dict, job_id: str, timeout_s: float = 120) -> dict:
    def done():
        job = job_json(info, job_id)
        return job if job["phase"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

    return wait_until(done, timeout_s, f"job {job_id} to end", interval_s=0.5)


def step_losses(info: dict, job_id: str) -> list[float]:
    out = tenax("job", job_id, "--metrics", "--controller", info["controller"], home=info["home"])
    return [json.loads(line)["loss"] for line in out.stdout.splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def etcd_read(url: str, coro_fn):
    async def run():
        async with Etcd(url, timeout_s=3.0) as etcd:
            return await coro_fn(etcd)

    return asyncio.run(asyncio.wait_for(run(), 15))


# ------------------------------------------------------------------ 1. the example job
def test_up_runs_the_example_job_to_success(tmp_path):
    with local_cluster(tmp_path) as info:
        found = nodes(info)
        assert sorted(found) == ["node-0", "node-1"]
        assert all(pb.NodeState.Name(n.state) == "READY" and n.slots == 2 for n in found.values())

        job_id = submit(info, job_file(tmp_path))
        job = wait_job_done(info, job_id)
        assert job["phase"] == "SUCCEEDED", (job["message"], job["workers"])
        assert sorted((w["rank"], w["state"]) for w in job["workers"]) == [(r, "EXITED") for r in range(4)]
        assert {w["node"] for w in job["workers"]} == {"node-0", "node-1"}
        logs = tenax("logs", job_id, "--rank", "3", "--controller", info["controller"], home=info["home"]).stdout
        assert "--- tenax: rank 3 generation 1" in logs  # fetched from the agent's HTTP endpoint
        losses = step_losses(info, job_id)
        assert len(losses) == job["steps"]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < first, f"loss did not go down: first 5 steps {first:.4f}, last 5 {last:.4f}"


# ------------------------------------------------------------------ 2. controller failover
def test_leader_controller_killed_mid_job_standby_takes_over(tmp_path):
    with local_cluster(tmp_path, controllers=2) as info:
        job_id = submit(info, job_file(tmp_path, steps=40))
        before = wait_job_step(info, job_id, 3)
        pids_before = {w["rank"]: w["pid"] for w in before["workers"]}
        leader = etcd_read(info["etcd"], lambda e: e.get(KEYS.leader()))
        old = LeaderRecord.from_json(leader.value)
        os.kill(info["pids"][old.id], signal.SIGKILL)
        t0 = time.monotonic()

        def new_leader():
            kv = etcd_read(info["etcd"], lambda e: e.get(KEYS.leader()))
            return kv is not None and LeaderRecord.from_json(kv.value).id != old.id

        wait_until(new_leader, TTL_S + 1 + 2, "a standby to lead")
        took = time.monotonic() - t0
        print(f"standby leads {took:.2f} s after the leader was killed (TTL {TTL_S} s)")
        assert took < TTL_S + 1, f"standby led after {took:.2f} s"

        job = wait_job_done(info, job_id)
        assert job["phase"] == "SUCCEEDED", (job["message"], job["workers"])
        assert {w["rank"]: w["pid"] for w in job["workers"]} == pids_before, "a worker was restarted"
        listed = json.loads(tenax("jobs", "--json", "--controller", ",".join(info["controllers"]),
                                  home=info["home"]).stdout)
        listed = listed.get("jobs", listed) if isinstance(listed, dict) else listed
        assert job_id in {j["id"] for j in listed}


# ------------------------------------------------------------------ 3. agent killed
def test_agent_killed_node_not_ready_and_its_workers_die(tmp_path):
    with local_cluster(tmp_path) as info:
        job_id = submit(info, job_file(tmp_path, steps=400))
        job = wait_job_step(info, job_id, 2)
        victims = [w["pid"] for w in job["workers"] if w["node"] == "node-1"]
        assert len(victims) == 2 and all(alive(p) for p in victims)

        os.kill(info["pids"]["node-1"], signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: not any(alive(p) for p in victims), 2, "node-1's workers to die", interval_s=0.02)
        workers_dead_s = time.monotonic() - t0
        wait_until(lambda: pb.NodeState.Name(nodes(info)["node-1"].state) == "NOT_READY",
                   TTL_S + 3, "node-1 NOT_READY", interval_s=0.05)
        not_ready_s = time.monotonic() - t0
        print(f"workers dead after {workers_dead_s * 1000:.0f} ms; NOT_READY after {not_ready_s:.2f} s")
        assert not_ready_s < TTL_S + 1
        assert pb.NodeState.Name(nodes(info)["node-0"].state) == "READY"
        tenax("cancel", job_id, "--controller", info["controller"], home=info["home"], check=False)


# ------------------------------------------------------------------ 4. etcd restart
def test_etcd_restart_mid_job_everyone_reconnects_and_job_finishes(tmp_path):
    etcd = start_etcd(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log")
    restarted = None
    try:
        with local_cluster(tmp_path, etcd=etcd.url) as info:
            job_id = submit(info, job_file(tmp_path, steps=40))
            wait_job_step(info, job_id, 3)
            leases_before = etcd_read(etcd.url, lambda e: e.get_prefix(KEYS.nodes()))
            leases_before = {kv.key: kv.lease for kv in leases_before if KEYS.parse_node_key(kv.key)}
            etcd.stop()
            time.sleep(TTL_S + 1)  # longer than a lease: everyone must notice and register again
            restarted = start_etcd(etcd.data_dir, client_port=etcd.client_port, peer_port=etcd.peer_port,
                                   log_path=tmp_path / "etcd-2.log")

            def re_registered():
                kvs = etcd_read(etcd.url, lambda e: e.get_prefix(KEYS.nodes()))
                now = {kv.key: kv.lease for kv in kvs if KEYS.parse_node_key(kv.key)}
                return set(now) == set(leases_before) and all(now[k] != leases_before[k] for k in now)

            wait_until(re_registered, 20, "both agents registered under new leases", interval_s=0.3)
            job = wait_job_done(info, job_id)
            assert job["phase"] == "SUCCEEDED", (job["message"], job["workers"])
            found = nodes(info)
            assert all(pb.NodeState.Name(n.state) == "READY" for n in found.values())
    finally:
        etcd.kill()
        if restarted:
            restarted.kill()
