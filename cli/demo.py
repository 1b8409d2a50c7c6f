"""`tenax demo` (and `make demo`): fault tolerance, live.

Starts a local cluster (2 agents x 2 slots), submits the example job, kills one of its
workers mid-run (the same ChaosService call as `tenax chaos kill`), and narrates what the
cluster does about it as it happens: the job's events (the worker's exit, the new plan,
the recovery), then the recovery's numbers (detection, new layout, MTTR, steps lost) and
whether the loss stayed on track. It ends with `tenax job` (the worker table, the goodput
and the timeline of events) and stops the cluster.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import yaml
from google.protobuf import json_format

from common.spec import JobSpec
from cli.local import REPO, ClusterError, LocalClusterSettings, _tenax, controller_channel, start_cluster, stop_cluster
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
VICTIM_RANK = 1


def say(text: str) -> None:
    print(f"demo | {text}", flush=True)


def loss_on_track(before: list[float], after: list[float]) -> tuple[bool, str]:
    """Did training go on where it was? The mean loss of the steps after the recovery is at or
    below the mean of the steps just before the kill (plus a little noise). Pure."""
    if not before or not after:
        return False, "not enough steps on both sides of the kill to compare"
    b, a = sum(before) / len(before), sum(after) / len(after)
    ok = a <= b * 1.05
    return ok, (f"mean loss of the {len(before)} steps before the kill {b:.4f}, of the last {len(after)} "
                f"steps {a:.4f}: {'on track' if ok else 'NOT on track'}")


class _Demo:
    def __init__(self, address: str, record: dict[str, Any] | None) -> None:
        self.address = address
        self.record = record
        self.seen_events = 0.0

    def call(self, stub: Callable[[grpc.Channel], Any], method: str, request: Any) -> Any:
        with controller_channel(self.address, self.record) as channel:
            return getattr(stub(channel), method)(request, timeout=10)

    def job(self, job_id: str) -> pb.Job:
        return self.call(pb_grpc.JobServiceStub, "GetJob", pb.GetJobRequest(job_id=job_id))

    def new_events(self, job_id: str) -> None:
        """Print the job's events written since the last call (the live timeline)."""
        reply = self.call(pb_grpc.JobServiceStub, "ListJobEvents",
                          pb.ListJobEventsRequest(job_id=job_id, since_time=self.seen_events))
        for e in reply.events:
            self.seen_events = max(self.seen_events, e.time)
            step = f" (step {e.step})" if e.step else ""
            say(f"  event {e.kind:<11}{step} {e.message}" + (f"  -> {e.action}" if e.action else ""))

    def wait(self, job_id: str, done: Callable[[pb.Job], bool], timeout_s: float) -> pb.Job:
        deadline = time.monotonic() + timeout_s
        while True:
            self.new_events(job_id)
            job = self.job(job_id)
            if done(job) or pb.JobPhase.Name(job.status.phase) in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} did not get there in {timeout_s:.0f} s")
            time.sleep(0.3)

    def losses(self, job_id: str) -> dict[int, float]:
        steps = self.call(pb_grpc.JobServiceStub, "GetJobMetrics", pb.GetJobMetricsRequest(job_id=job_id)).steps
        return {s.step: s.loss for s in steps}


def register(sub) -> None:
    demo = sub.add_parser("demo", help="start a local cluster, train the example job, kill a worker mid-run and "
                                       "show the recovery live, stop")
    demo.add_argument("--job", type=Path, default=REPO / "examples" / "tiny-gpt.yaml")
    demo.set_defaults(func=_demo)


def _demo(args) -> int:
    if not args.job.is_file():
        print(f"tenax demo: no job file {args.job}", file=sys.stderr)
        return 1
    return run_demo(args.job)


def run_demo(job_file: Path, *, kill_at_fraction: float = 0.35) -> int:
    spec = yaml.safe_load(job_file.read_text())
    steps = int(spec.get("steps", 60))
    state_dir = Path(tempfile.mkdtemp(prefix="tenax-demo-"))
    say("starting a local cluster: etcd, a controller, 2 agents with 2 worker slots each")
    try:
        state = start_cluster(LocalClusterSettings(state_dir=state_dir, agents=2, slots=2).validate())
    except (ClusterError, RuntimeError) as exc:
        print(f"tenax demo: {exc}", file=sys.stderr)
        return 1
    record = state.get("security")
    demo = _Demo(state["controller"], record)
    try:
        with controller_channel(demo.address, record) as channel:
            msg = json_format.ParseDict(JobSpec.from_dict(spec).to_dict(), pb.JobSpec())
            job = pb_grpc.JobServiceStub(channel).SubmitJob(pb.SubmitJobRequest(spec=msg), timeout=10)
        job_id = job.id
        say(f"submitted {job_id}: {steps} steps, dp={spec['parallelism']['dp']} pp={spec['parallelism']['pp']}")
        kill_at = max(int(steps * kill_at_fraction), 3)
        job = demo.wait(job_id, lambda j: j.status.step >= kill_at, 300)
        if pb.JobPhase.Name(job.status.phase) in TERMINAL:
            raise ClusterError(f"job {job_id} ended before the kill: {job.status.message}")
        victim = next(w for w in job.status.workers if w.rank == VICTIM_RANK)
        say(f"step {job.status.step}, loss {job.status.loss:.4f}: killing rank {VICTIM_RANK} "
            f"({victim.node} slot {victim.slot}, pid {victim.pid}) -- `tenax chaos kill --job {job_id} "
            f"--rank {VICTIM_RANK}`")
        killed_at = time.time()
        demo.call(pb_grpc.ChaosServiceStub, "Inject", pb.ChaosRequest(action="kill", job_id=job_id,
                                                                      rank=VICTIM_RANK))
        job = demo.wait(job_id, lambda j: any(r.total_s > 0 for r in j.status.recoveries), 120)
        rec = next((r for r in job.status.recoveries if r.total_s > 0), None)
        if rec is not None:
            say(f"recovered in {time.time() - killed_at:.1f} s of wall time: cause {rec.cause!r}")
            say(f"  layout dp={rec.old_layout.dp}·pp={rec.old_layout.pp} -> dp={rec.new_layout.dp}·pp="
                f"{rec.new_layout.pp} (generation {rec.generation}); survivors kept their processes")
            say(f"  detection {rec.detection_s:.3f} s, plan {rec.plan_s:.3f} s, rebuild {rec.rebuild_s:.3f} s, "
                f"transfer {rec.transfer_s:.3f} s: MTTR {rec.total_s:.3f} s; steps lost {rec.steps_lost}")
        job = demo.wait(job_id, lambda j: False, 600)
        losses = demo.losses(job_id)
        at = int(rec.at_step) if rec is not None else kill_at
        ok, why = loss_on_track([losses[s] for s in range(max(at - 5, 1), at + 1) if s in losses],
                                [losses[s] for s in sorted(losses)[-5:]])
        say(f"loss: {why}")
        phase = pb.JobPhase.Name(job.status.phase)
        say(f"job {job_id} {phase}: {job.status.message}")
        print(flush=True)
        _tenax("job", job_id, "--events", "30", "--controller", demo.address, record=record, timeout_s=30)
        print(f"logs: {state['logs']}", file=sys.stderr)
        return 0 if phase == "SUCCEEDED" and rec is not None else 1
    except (ClusterError, grpc.RpcError, StopIteration) as exc:
        print(f"tenax demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_cluster(state)
