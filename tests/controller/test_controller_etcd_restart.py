"""etcd stops and restarts under a running controller: it reconnects, leads again and keeps deciding."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.embedded_etcd import start_etcd
from common.etcd import EtcdError, EtcdUnavailable
from protos import tenax_pb2 as pb
from protos.records import WorkerStatusRecord
from tests.conftest import run_async
from tests.controller.test_controller_api import KEYS, add_node, good_spec, running, wait_until

pytestmark = pytest.mark.timeout(120)


def test_controller_survives_an_etcd_restart(tmp_path):
    server = start_etcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    restarted = None
    try:
        async def main():
            nonlocal restarted
            async with running(server.url) as api:
                await add_node(api.etcd, "n1", 2, ttl_s=600)
                job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=good_spec()), timeout=5)
                await wait_until(lambda: _phase(api, job.id, pb.RUNNING), 10)

                await asyncio.to_thread(server.stop)
                # while etcd is down, reads from the mirror still answer; etcd reads say UNAVAILABLE
                listed = await api.jobs.ListJobs(pb.ListJobsRequest(), timeout=5)
                assert [j.id for j in listed.jobs] == [job.id]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await api.jobs.GetJob(pb.GetJobRequest(job_id=job.id), timeout=15)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(1.0)
                restarted = await asyncio.to_thread(start_etcd, server.data_dir, client_port=server.client_port,
                                                    peer_port=server.peer_port, log_path=tmp_path / "etcd2.log")

                async def put_exits() -> bool:
                    try:
                        for rank in range(2):
                            await api.etcd.put(KEYS.job_worker(job.id, rank), WorkerStatusRecord(
                                rank=rank, node="n1", slot=rank, state="EXITED", exit_code=0,
                                generation=1).to_json())
                        return True
                    except (EtcdError, EtcdUnavailable):
                        return False
                await wait_until(put_exits, 20, 0.5)
                # the mirror's watch reconnected and the (re-)elected leader decides
                await wait_until(lambda: _phase(api, job.id, pb.SUCCEEDED), 30, 0.2)
                await wait_until(lambda: api.controller.is_leader, 20)
                second = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=good_spec()), timeout=5)
                await wait_until(lambda: _phase(api, second.id, pb.RUNNING), 20, 0.2)
        run_async(main(), 100)
    finally:
        server.kill()
        if restarted:
            restarted.kill()


async def _phase(api, job_id: str, phase: int) -> bool:
    try:
        job = await api.jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return job.status.phase == phase
