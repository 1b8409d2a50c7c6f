"""Two controller processes elect a leader; kill -9 the leader and the standby leads within TTL + 1 s."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.etcd import Etcd
from controller.server import LEADER_SERVICE
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.records import NodeRecord, WorkerStatusRecord
from tests.conftest import run_async
from tests.helpers.controller_procs import ControllerProc, run_cli

pytestmark = pytest.mark.timeout(120)
KEYS = Keys()
TTL_S = 2


async def leader_id(etcd: Etcd) -> str | None:
    kv = await etcd.get(KEYS.leader())
    return json.loads(kv.value)["id"] if kv else None


async def wait_for(pred, timeout_s: float):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = await pred()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s")


async def leads(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=LEADER_SERVICE),
                                                          timeout=5)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def test_standby_takes_over_within_ttl_and_no_job_is_lost(etcd_url, tmp_path):
    procs: list[ControllerProc] = []
    try:
        procs.append(ControllerProc(etcd_url, "first", tmp_path, ttl_s=TTL_S))

        async def phase1():
            async with Etcd(etcd_url) as etcd:
                assert await wait_for(lambda: _is(etcd, "first"), 10)
                lease = await etcd.grant_lease(600)
                await etcd.put(KEYS.node("n1"), NodeRecord(id="n1", slots=2, store_address="127.0.0.1:1").to_json(),
                               lease=lease)
                async with grpc.aio.insecure_channel(procs[0].address) as ch:
                    stub = pb_grpc.JobServiceStub(ch)
                    spec = pb.JobSpec(name="keep", parallelism=pb.Parallelism(dp=2, pp=1),
                                      resources=pb.Resources(workers=2))
                    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=5)
                    await wait_for(lambda: _phase(stub, job.id, pb.RUNNING), 10)
                return job.id
        job_id = run_async(phase1(), 40)

        procs.append(ControllerProc(etcd_url, "second", tmp_path, ttl_s=TTL_S))
        assert run_async(leads(procs[0].address), 10) and not run_async(leads(procs[1].address), 10)

        procs[0].kill()
        killed_at = time.monotonic()

        async def phase2():
            async with Etcd(etcd_url) as etcd:
                await wait_for(lambda: _is(etcd, "second"), TTL_S + 5)
                took = time.monotonic() - killed_at
                assert took <= TTL_S + 1, f"standby took {took:.2f} s to lead"
                async with grpc.aio.insecure_channel(procs[1].address) as ch:
                    stub = pb_grpc.JobServiceStub(ch)
                    listed = await stub.ListJobs(pb.ListJobsRequest(), timeout=5)
                    assert [j.id for j in listed.jobs] == [job_id]
                    assert listed.jobs[0].status.phase == pb.RUNNING
                    # the new leader takes the decisions now: workers finish -> SUCCEEDED
                    for rank in range(2):
                        await etcd.put(KEYS.job_worker(job_id, rank), WorkerStatusRecord(
                            rank=rank, node="n1", slot=rank, state="EXITED", exit_code=0, generation=1).to_json())
                    await wait_for(lambda: _phase(stub, job_id, pb.SUCCEEDED), 10)
                assert await leads(procs[1].address)
                return took
        took = run_async(phase2(), 40)

        # the CLI rides over the dead replica (address list) and sees the job
        out = run_cli(["jobs", "--json", "--plaintext", "--controller", f"{procs[0].address},{procs[1].address}"])
        assert out.returncode == 0, out.stderr
        assert [(j["id"], j["phase"]) for j in json.loads(out.stdout)] == [(job_id, "SUCCEEDED")]
        print(f"takeover after kill -9: {took:.2f} s (TTL {TTL_S} s)")
    finally:
        for p in procs:
            p.kill()


async def _is(etcd: Etcd, replica: str) -> bool:
    return await leader_id(etcd) == replica


async def _phase(stub, job_id: str, phase: int) -> bool:
    job = await stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
    return job.status.phase == phase


def test_graceful_stop_hands_leadership_over_at_once(etcd_url, tmp_path):
    """SIGTERM: the leader revokes its lease on the way out, so the standby need not wait a TTL."""
    import os
    import signal

    procs: list[ControllerProc] = []
    try:
        procs.append(ControllerProc(etcd_url, "first", tmp_path, ttl_s=10))

        async def first_leads():
            async with Etcd(etcd_url) as etcd:
                await wait_for(lambda: _is(etcd, "first"), 10)
        run_async(first_leads(), 20)
        procs.append(ControllerProc(etcd_url, "second", tmp_path, ttl_s=10))
        os.killpg(procs[0].proc.pid, signal.SIGTERM)
        stopped_at = time.monotonic()

        async def second_leads():
            async with Etcd(etcd_url) as etcd:
                await wait_for(lambda: _is(etcd, "second"), 8)
            return time.monotonic() - stopped_at
        took = run_async(second_leads(), 20)
        assert took < 5, f"handover took {took:.2f} s; a resigning leader must not make the standby wait its TTL"
        assert procs[0].proc.wait(timeout=10) == 0
    finally:
        for p in procs:
            p.kill()
