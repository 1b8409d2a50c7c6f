"""The gRPC edge: generated proto types <-> domain records.

Only the servicers and the CLI touch generated types; everything behind them
works on common.spec.JobSpec, protos.plan.Plan and protos.records.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from common import events
from common.layout import public_store_prefix
from controller.goodput import Goodput
from controller.recovery_decisions import newest_by_slot, next_failure_cost
from controller.state import JobView, NodeSummary
from protos import tenax_pb2 as pb
from protos.plan import Plan
from protos.records import JobEventRecord, StepRecord
from common.spec import JobSpec


def spec_from_proto(msg: pb.JobSpec) -> JobSpec:
    """Validate a submitted spec (raises SpecError naming the field)."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return JobSpec.from_dict(data)


def spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    return json_format.ParseDict(spec.to_dict(), pb.JobSpec(), ignore_unknown_fields=True)


def spec_dict_to_proto(data: dict[str, Any]) -> pb.JobSpec:
    """For the CLI: YAML mapping -> proto. Unknown keys are kept out of the message
    but reported by the server's validation only if they fit; so the CLI validates first."""
    return json_format.ParseDict(data, pb.JobSpec())


def layout_to_proto(dp: int, pp: int, zero_stage: int) -> pb.Layout:
    return pb.Layout(dp=dp, pp=pp, zero_stage=zero_stage)


def plan_to_proto(plan: Plan) -> pb.Plan:
    return pb.Plan(
        job_id=plan.job_id,
        generation=plan.generation,
        workers=[pb.WorkerAssignment(rank=w.rank, node=w.node, slot=w.slot, dp_rank=w.dp_rank, pp_rank=w.pp_rank)
                 for w in plan.workers],
        layout=layout_to_proto(plan.dp, plan.pp, plan.zero_stage),
        layer_partition=list(plan.layer_partition),
        sample_shares=list(plan.sample_shares),
        store_address=plan.store_address,
        store_prefix=public_store_prefix(plan.store_prefix),  # the secret stays in etcd
        switch_at_step=plan.switch_at_step,
        reason=plan.reason,
    )


def recovery_to_proto(data: dict[str, Any]) -> pb.Recovery:
    """A recovery dict (from etcd) -> proto; unknown or malformed fields are dropped."""
    msg = pb.Recovery()
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=True)
    except json_format.ParseError:
        msg = pb.Recovery(cause=str(data.get("cause", "")))
    return msg


def job_to_proto(job: JobView) -> pb.Job:
    status = pb.JobStatus(
        phase=pb.JobPhase.Value(job.status.phase),
        message=job.status.message,
        step=job.progress.step,
        loss=job.progress.loss if job.progress.loss is not None else 0.0,
        tokens_per_s=job.progress.tokens_per_s,
        generation=job.plan.generation if job.plan else job.status.generation,
        recoverable_step=max(job.progress.recoverable_step, job.status.recoverable_step),
        created=job.status.created,
        updated=job.status.updated,
        eta_s=job.progress.eta_s if job.status.phase in ("RUNNING", "RECOVERING") else 0.0,
    )
    if job.plan:
        status.layout.CopyFrom(layout_to_proto(job.plan.dp, job.plan.pp, job.plan.zero_stage))
        if job.status.phase in ("RUNNING", "RECOVERING"):
            status.redundancy, status.next_failure_cost = next_failure_cost(
                job.spec, job.plan, step=status.step, recoverable_step=status.recoverable_step)
        # a worker is its (node, slot): ranks are renumbered when the layout changes
        by_slot = newest_by_slot(job.plan, job.workers)
        for a in job.plan.workers:
            w = by_slot.get(a.rank)
            status.workers.append(pb.WorkerStatus(
                rank=a.rank, node=a.node, slot=a.slot,
                pid=w.pid if w else 0,
                state=w.state if w else "PENDING",
                exit_code=(w.exit_code or 0) if w else 0,
                signal=w.signal if w else "",
            ))
    else:
        par = job.spec.parallelism
        status.layout.CopyFrom(layout_to_proto(par.dp, par.pp, par.zero_stage))
    status.recoveries.extend(recovery_to_proto(r) for r in job.status.recoveries)
    return pb.Job(id=job.id, spec=spec_to_proto(job.spec), status=status)


def node_to_proto(node: NodeSummary) -> pb.NodeInfo:
    rec = node.record
    msg = pb.NodeInfo(
        id=node.id,
        hostname=str(rec.get("hostname", "")),
        address=str(rec.get("address", "")),
        slots=int(rec.get("slots", 0) or 0),
        used_slots=node.used_slots,
        state=pb.NodeState.Value(node.state),
        condition=pb.NodeCondition.Value(_condition_name(str(rec.get("condition", "HEALTHY")))),
        condition_reason=node.reason,
        store_address=str(rec.get("store_address", "")),
    )
    devices = rec.get("slot_devices")
    if isinstance(devices, list):
        msg.slot_devices.extend(str(d) for d in devices)
    labels = rec.get("labels")
    if isinstance(labels, dict):
        msg.labels.update({str(k): str(v) for k, v in labels.items()})
    if node.health:
        try:
            json_format.ParseDict(node.health, msg.health, ignore_unknown_fields=True)
        except json_format.ParseError:
            msg.ClearField("health")  # telemetry is advisory: a bad sample is dropped
    return msg


def _condition_name(condition: str) -> str:
    return {"HEALTHY": "HEALTHY", "DEGRADED": "DEGRADED", "FAILED": "FAILED_CONDITION"}.get(
        condition, "NODE_CONDITION_UNSPECIFIED")


def step_to_proto(step: StepRecord) -> pb.StepMetrics:
    return pb.StepMetrics(step=step.step, loss=step.loss, generation=step.generation, time=step.time,
                          step_time_s=step.step_time_s, tokens_per_s=step.tokens_per_s,
                          eval_loss=step.eval_loss, eval_perplexity=step.eval_perplexity)


def event_to_proto(event: JobEventRecord) -> pb.JobEventEntry:
    d = events.event_json(event)
    return pb.JobEventEntry(time=d["time"], kind=d["kind"], step=d["step"], generation=d["generation"],
                            message=d["message"], action=d["action"], data_json=events.data_json(d["data"]))


def goodput_to_proto(g: Goodput) -> pb.Goodput:
    return pb.Goodput(**g.to_dict())


def phase_name(value: int) -> str:
    return pb.JobPhase.Name(value)


def node_state_name(value: int) -> str:
    return pb.NodeState.Name(value)
