"""What the in-memory snapshots cover and what the next failure would cost (pure), and the
safe disk-checkpoint defaults of the job spec."""

from __future__ import annotations

import pytest

from common.spec import DEFAULT_CHECKPOINT_EVERY, JobSpec, SpecError
from controller.recovery_decisions import next_failure_cost, snapshot_redundancy
from protos.plan import Plan, WorkerAssignment


def plan_on(*nodes: str) -> Plan:
    workers = tuple(WorkerAssignment(rank=r, node=n, slot=r, dp_rank=r, pp_rank=0) for r, n in enumerate(nodes))
    return Plan(job_id="j", generation=1, workers=workers, dp=len(nodes), pp=1, zero_stage=1,
                layer_partition=(0, 4), sample_shares=tuple([16 // len(nodes)] * len(nodes)),
                store_address="s:1", store_prefix="j/g1/")


def spec(**elastic) -> JobSpec:
    return JobSpec.from_dict({"global_batch_size": 16, "parallelism": {"dp": 4}, "resources": {"workers": 4},
                              "elastic": elastic})


def test_redundancy_across_two_nodes_covers_a_node():
    worker, node, text = snapshot_redundancy(plan_on("a", "a", "b", "b"))
    assert (worker, node) == (True, True) and text.startswith("one failure, or the loss of one node")


def test_redundancy_on_one_node_or_an_unbalanced_placement_covers_a_worker_only():
    worker, node, text = snapshot_redundancy(plan_on("a", "a"))
    assert (worker, node) == (True, False) and "ranks [0, 1] keep their replica on their own node (a)" in text
    # 3 ranks on a, 1 on b: one rank of a must replicate within a
    worker, node, text = snapshot_redundancy(plan_on("a", "a", "a", "b"))
    assert (worker, node) == (True, False) and "not the loss of a node" in text
    assert snapshot_redundancy(plan_on("a"))[:2] == (False, False)


def test_next_failure_cost_from_memory_when_the_snapshots_cover_it():
    redundancy, cost = next_failure_cost(spec(), plan_on("a", "b"), step=250, recoverable_step=249)
    assert redundancy.startswith("one failure, or the loss of one node")
    assert cost == "a worker or node failure: 1 step(s) from memory"


def test_next_failure_cost_of_a_node_from_disk_when_every_copy_is_on_it():
    # the trainer writes every snapshot to disk while memory does not cover a node: as recent as memory
    _, cost = next_failure_cost(spec(checkpoint_every=100), plan_on("a", "a"), step=250, recoverable_step=249)
    assert cost == ("a worker failure: 1 step(s) from memory; "
                    "a node loss: about 1 step(s) from disk (every snapshot also goes to disk while memory "
                    "does not cover this)")
    _, cost = next_failure_cost(spec(checkpoint_every=100), plan_on("a"), step=40, recoverable_step=0)
    assert cost.startswith("a worker or node failure: about 40 step(s) from disk")
    _, cost = next_failure_cost(spec(checkpoint_every=0), plan_on("a"), step=40, recoverable_step=0)
    assert cost == "a worker or node failure: the job (elastic.checkpoint_every: 0, no disk checkpoint)"


def test_disk_checkpoints_are_on_by_default_and_kept_to_the_last_few():
    s = JobSpec()
    assert s.elastic.checkpoint_every == DEFAULT_CHECKPOINT_EVERY > 0
    assert s.elastic.checkpoint_keep >= 1
    assert JobSpec.from_dict({"elastic": {"checkpoint_every": 0}}).elastic.checkpoint_every == 0  # still off on request
    with pytest.raises(SpecError, match=r"^elastic\.checkpoint_keep: must be >= 1, got 0"):
        JobSpec.from_dict({"elastic": {"checkpoint_keep": 0}})


def test_checkpoint_keep_travels_through_the_grpc_spec():
    from controller.convert import spec_dict_to_proto, spec_from_proto

    msg = spec_dict_to_proto({"name": "j", "elastic": {"checkpoint_keep": 5, "checkpoint_every": 20}})
    got = spec_from_proto(msg)
    assert (got.elastic.checkpoint_keep, got.elastic.checkpoint_every) == (5, 20)


def test_the_job_status_says_what_the_next_failure_would_cost(etcd_url):
    """Through the real path: real etcd, an in-process controller, GetJob over gRPC."""
    from protos import tenax_pb2 as pb
    from tests.conftest import run_async
    from tests.controller.test_controller_api import _in_phase, add_node, good_spec, running, wait_until
    from tests.controller.test_recovery_controller import plan_of, report_running

    async def main():
        async with running(etcd_url) as api:
            leases = [await add_node(api.etcd, n, 2, ttl_s=30) for n in ("n1", "n2")]
            job = await api.jobs.SubmitJob(pb.SubmitJobRequest(spec=good_spec(**{
                "parallelism.pp": 2, "resources.workers": 4, "steps": 500, "elastic.checkpoint_every": 0})),
                timeout=5)
            await wait_until(lambda: _in_phase(api, job.id, pb.RUNNING), 5)
            await report_running(api, await plan_of(api, job.id), step=7)

            async def reported():
                got = await api.jobs.GetJob(pb.GetJobRequest(job_id=job.id), timeout=5)
                return got if got.status.step == 7 else None
            got = await wait_until(reported, 5)
            assert got.status.redundancy.startswith("one failure, or the loss of one node")
            assert got.status.next_failure_cost == "a worker or node failure: 0 step(s) from memory"
            assert got.spec.elastic.checkpoint_keep == 3  # the default, filled in at submit
            for lease in leases:
                await api.etcd.revoke_lease(lease)
    run_async(main(), 60)
