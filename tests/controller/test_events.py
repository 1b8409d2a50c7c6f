"""controller/events.py: root causes, and events from key changes (pure parts)."""

from __future__ import annotations

from controller.events import (change_events, drain_events, failed_message, hang_cause, node_lost_events,
                               root_cause)
from controller.recovery_decisions import Failure
from protos.plan import Plan, WorkerAssignment
from protos.records import CordonRecord, GrowthRecord, JobStatusRecord, WorkerStatusRecord

PLAN = Plan(job_id="j", generation=1, workers=(WorkerAssignment(rank=0, node="n0", slot=0, dp_rank=0, pp_rank=0),
                                               WorkerAssignment(rank=1, node="n1", slot=0, dp_rank=1, pp_rank=0)),
            dp=2, pp=1, zero_stage=1, layer_partition=(0, 2), sample_shares=(4, 4), store_address="h:1",
            store_prefix="j/g1/", switch_at_step=-1, reason="scheduled")


def failure(ranks=(1,), nodes=()) -> Failure:
    return Failure(cause="node-lost" if nodes else "worker-failed", lost_ranks=frozenset(ranks),
                   lost_nodes=frozenset(nodes), failed_at=10.0, description="rank 1 on n1 failed (signal SIGKILL)")


def worker(**kw) -> WorkerStatusRecord:
    base = dict(rank=1, node="n1", state="FAILED", slot=0, pid=42, exit_code=137, signal="SIGKILL", generation=1)
    return WorkerStatusRecord(**{**base, **kw})


def test_root_cause_prefers_the_recorded_cause_then_the_last_error():
    cause = hang_cause(1, 4.13, True) + "; killed"
    assert cause == "hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP; killed"
    assert root_cause(failure(), PLAN, {1: worker(cause=cause, last_error="KeyboardInterrupt")}) == cause
    err = "RuntimeError: [gloo] Connection closed by peer"
    got = root_cause(failure(), PLAN, {1: worker(signal="", exit_code=1, last_error=err)})
    assert got == f"worker-failed: rank 1 on n1 failed (exit code 1); last error: {err}"
    assert root_cause(failure(), PLAN, {1: worker()}) == "worker-failed"


def test_a_failed_jobs_message_ends_with_the_last_exception_line():
    err = "RuntimeError: [gloo] Connection closed by peer"
    msg = failed_message(failure(), "only 0 workers available", PLAN, {1: worker(exit_code=1, last_error=err)})
    assert msg.startswith("cannot recover from rank 1 on n1 failed") and msg.endswith(f"; last error: {err}")


def test_node_lost_events_name_the_node_and_its_ranks():
    [event] = node_lost_events(failure(ranks=(1,), nodes=("n1",)), PLAN, step=9, now=11.0)
    assert (event.kind, event.step, event.data["node"], event.data["ranks"]) == ("node-lost", 9, "n1", [1])


def test_phase_and_growth_changes_become_events_once():
    running = JobStatusRecord(phase="RUNNING", message="scheduled", created=1.0, updated=2.0, generation=1)
    made, memory = change_events("put", "status", running.to_json(), None, job="j")
    assert made == [] and memory == "RUNNING"  # first sight (a load): its leader wrote it
    failed = JobStatusRecord(phase="FAILED", message="cannot recover", created=1.0, updated=5.0)
    made, memory = change_events("put", "status", failed.to_json(), "RUNNING", job="j")
    assert [(e.kind, e.time, e.data["from"], e.data["to"]) for e in made] == [("phase", 5.0, "RUNNING", "FAILED")]
    assert change_events("put", "status", failed.to_json(), "FAILED", job="j")[0] == []
    growth = GrowthRecord(id="g2-x", base_generation=1, plan=PLAN.to_dict(), joiners=[{"node": "n2", "slot": 0,
                                                                                      "rank": 2}], started=3.0)
    made, memory = change_events("put", "growth", growth.to_json(), None, job="j")
    assert made[0].kind == "growth" and "n2/0" in made[0].message and made[0].time == 3.0
    assert change_events("put", "growth", growth.to_json(), memory, job="j")[0] == []
    assert change_events("put", "status", "{garbage", "RUNNING", job="j") == ([], "RUNNING")


def test_drain_events_only_for_a_drain():
    assert drain_events("n1", CordonRecord(time=1.0, reason="cordon"), ["j"]) == []
    [(job, event)] = drain_events("n1", CordonRecord(time=1.0, reason="drain"), ["j"])
    assert job == "j" and event.kind == "drain" and event.data["node"] == "n1"
