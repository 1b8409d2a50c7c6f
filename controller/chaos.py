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

import json
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import grpc

from controller.etcd import Etcd
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.keys import Keys
from protos.plan import Plan

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("tenax.controller.chaos")

RANK_ACTIONS = ("kill", "hang", "slow")
NODE_ACTIONS = ("kill-node",)
ACTIONS = RANK_ACTIONS + NODE_ACTIONS
MAX_SLOW_FACTOR = 100.0
"""Largest slowdown accepted (dimensionless): beyond it a rank is hung, not slow."""


@dataclass(kw_only=True, frozen=True)
class ChaosRecord:
    """One request at ``Keys.chaos_request(node, id)`` (JSON)."""

    id: str
    action: str
    """kill | hang | slow | kill-node."""
    node: str
    """The agent that carries it out."""
    job: str = ""
    rank: int = -1
    generation: int = 0
    """Plan generation the rank was resolved in; the agent acts only on that rank's current worker."""
    factor: float = 1.0
    """slow: compute time multiplier (>= 1; 1 restores full speed)."""
    reason: str = ""
    """Why (operator chaos, or the health loop's decision)."""
    time: float = 0.0
    """Unix seconds when the request was written."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "ChaosRecord":
        """Raises ValueError on anything malformed (the agent logs and drops it)."""
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chaos request is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("chaos request must be a JSON object")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        try:
            record = cls(**known)
            record = cls(**{**asdict(record), "rank": int(record.rank), "generation": int(record.generation),
                            "factor": float(record.factor), "time": float(record.time)})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chaos request is malformed: {exc}") from exc
        problem = validate_action(record.action, job=record.job, rank=record.rank, factor=record.factor,
                                  node=record.node)
        if problem:
            raise ValueError(problem)
        return record


def validate_action(action: str, *, job: str, rank: int, factor: float, node: str) -> str:
    """'' when the request makes sense, else what is wrong with it (naming the field). Pure."""
    if action not in ACTIONS:
        return f"action: must be one of {', '.join(ACTIONS)}, got {action!r}"
    if action in NODE_ACTIONS:
        return "" if node else "node_id: required for kill-node"
    if not job:
        return f"job_id: required for {action}"
    if rank < 0:
        return f"rank: must be >= 0, got {rank}"
    if action == "slow" and not (math.isfinite(factor) and 1.0 <= factor <= MAX_SLOW_FACTOR):
        return f"factor: must be in [1, {MAX_SLOW_FACTOR:g}] for slow, got {factor}"
    return ""


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

    def __init__(self, controller: "Controller") -> None:
        self.c = controller

    async def Inject(self, request: pb.ChaosRequest, context) -> pb.ChaosResponse:
        from controller import metrics
        from controller.api import RpcAbort, _status_for
        from controller.etcd import EtcdError

        code = grpc.StatusCode.OK
        try:
            return await self._inject(request)
        except (RpcAbort, EtcdError) as exc:
            code, message = _status_for(exc)
        except Exception as exc:  # never leak a traceback to the client
            log.exception("Inject failed")
            code, message = _status_for(exc)
        finally:
            metrics.GRPC_REQUESTS.labels("Inject", code.name).inc()
        await context.abort(code, message)

    async def _inject(self, request: pb.ChaosRequest) -> pb.ChaosResponse:
        from controller.api import RpcAbort
        from controller.state import jobs_from

        if request.ByteSize() > 4096:
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
            record = rank_request(action=action, plan=job.plan, job=job.id, rank=request.rank,
                                  reason="operator chaos", now=now, factor=factor)
        await send(self.c.etcd, self.c.keys, record)
        target = f"job {record.job} rank {record.rank}" if record.job else f"node {record.node}"
        return pb.ChaosResponse(id=record.id, node_id=record.node,
                                message=f"{action} {target}: sent to agent {record.node}")

