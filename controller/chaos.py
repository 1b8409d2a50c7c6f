"""Chaos and kill requests: the controller side.

An operator (``tenax chaos ...``, the ``ChaosService.Inject`` RPC, admin only)
or the controller's health loop (a hung rank) asks for something to happen to
a rank or a node. The controller resolves the job's rank to the node that runs
it in the current plan and writes one request record at
``Keys.chaos_request(node, id)``. The agent of that node watches its prefix,
carries the request out (agent/chaos.py) and deletes it.

Actions:

    kill       SIGKILL the rank's worker (its process group)
    hang       SIGSTOP the rank's worker: a hung rank, as the hang detector sees it
    slow       the worker multiplies its compute time by ``factor`` (a straggler)
    kill-node  the agent kills its workers and exits without revoking its lease (a crash)

Requests are addressed by node, so an agent needs one watch for all of them,
and a kill-node request never depends on a job.
"""

from __future__ import annotations

import logging
import secrets
import time

import grpc

from common.etcd import Etcd
from controller.auth import owner_name
from controller.handle import ControllerHandle
from controller.rpc import RpcAbort, unary
from controller.state import jobs_from
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.chaos import NODE_ACTIONS, ChaosRecord, validate_action
from protos.keys import Keys
from protos.plan import Plan

MAX_CHAOS_REQUEST_BYTES = 4096
"""A chaos request is a few short fields; anything bigger is refused."""

log = logging.getLogger("tenax.controller.chaos")

def resolve_rank(plan: Plan | None, job: str, rank: int) -> tuple[str | None, str]:
    """(node running ``rank`` in the job's current plan, reason) ; node None if there is none. Pure."""
    if plan is None:
        return None, f"job {job} has no plan yet (not scheduled)"
    try:
        return plan.worker(rank).node, f"rank {rank} runs on {plan.worker(rank).node} (generation {plan.generation})"
    except KeyError:
        return None, f"rank: job {job} has ranks 0..{plan.world_size - 1} in generation {plan.generation}, not {rank}"


def new_request_id(now: float) -> str:
    """Sortable by time, unique across replicas."""
    return f"{int(now * 1000):015d}-{secrets.token_hex(4)}"


async def send(etcd: Etcd, keys: Keys, record: ChaosRecord) -> None:
    """Write the request where the node's agent watches for it."""
    await etcd.put(keys.chaos_request(record.node, record.id), record.to_json())
    log.warning("chaos %s for %s%s sent to %s: %s", record.action,
                f"job {record.job} rank {record.rank}" if record.job else "node ", "" if record.job else record.node,
                record.node, record.reason)


def rank_request(*, action: str, plan: Plan, job: str, rank: int, reason: str, now: float,
                 factor: float = 1.0) -> ChaosRecord:
    """A request about one rank of ``plan`` (raises KeyError if the plan has no such rank)."""
    node = plan.worker(rank).node
    return ChaosRecord(id=new_request_id(now), action=action, node=node, job=job, rank=rank,
                       generation=plan.generation, factor=factor, reason=reason, time=now)


# ------------------------------------------------------------------ gRPC
class ChaosService(pb_grpc.ChaosServiceServicer):
    """``tenax.v1.ChaosService``: admin-only fault injection (controller/auth.py)."""

    def __init__(self, handle: ControllerHandle) -> None:
        self.c = handle

    @unary
    async def Inject(self, request: pb.ChaosRequest, context) -> pb.ChaosResponse:
        if request.ByteSize() > MAX_CHAOS_REQUEST_BYTES:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "chaos request too large")
        action = request.action
        factor = request.factor or (1.5 if action == "slow" else 1.0)
        problem = validate_action(action, job=request.job_id, rank=request.rank, factor=factor,
                                  node=request.node_id)
        if problem:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        now = time.time()
        if action in NODE_ACTIONS:
            if self.c.cache.get(self.c.keys.node(request.node_id)) is None:
                raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"node_id: no registered node {request.node_id!r}")
            record = ChaosRecord(id=new_request_id(now), action=action, node=request.node_id,
                                 reason="operator chaos", time=now)
        else:
            job = jobs_from(self.c.cache).get(request.job_id)
            if job is None:
                raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
            node, why = resolve_rank(job.plan, job.id, request.rank)
            if node is None:
                raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, why)
            # the root cause a killed worker's recovery record names
            who = owner_name() or "an operator"
            record = rank_request(action=action, plan=job.plan, job=job.id, rank=request.rank,
                                  reason=f"chaos: {action} of rank {request.rank} requested by {who}", now=now,
                                  factor=factor)
        await send(self.c.etcd, self.c.keys, record)
        target = f"job {record.job} rank {record.rank}" if record.job else f"node {record.node}"
        return pb.ChaosResponse(id=record.id, node_id=record.node,
                                message=f"{action} {target}: sent to agent {record.node}")

