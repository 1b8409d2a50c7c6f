"""End to end, issue 4: elastic in-place recovery through real `tenax up` clusters.

Real etcd, controller, agents and trainer workers over gloo; faults are real
(``kill -9`` of a worker or of an agent). Every test checks, against an
uninterrupted ``tenax train-local`` run of the same spec (the same loss curve is
DESIGN principle 4):

* the job SUCCEEDS, every step 1..N has a loss equal to the reference within rtol 1e-4;
* no surviving worker's pid changed (a worker is its (node, slot));
* steps lost <= 1 (0 for planned changes: growth, drain);
* the recovery is recorded in ``tenax job ID --json`` with its time split.

Every test kills everything it starts (``local_cluster`` and ``extra_agent``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli.client import job_record
from cli.local import controller_channel
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.plan import Plan
from tests.conftest import REPO
from tests.e2e.test_e2e_cluster import (KEYS, TTL_S, alive, etcd_read, job_file, job_json, local_cluster, nodes, submit,
                                        tenax, wait_job_done, wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

STEPS = 50
RTOL = 1e-4


# ------------------------------------------------------------------ helpers
def spec_file(tmp_path: Path, **overrides) -> Path:
    return job_file(tmp_path, steps=STEPS, **overrides)


_INT64_FIELDS = ("generation", "at_step", "steps_lost", "bytes_moved", "bytes_local")
"""Recovery fields that are int64 in the proto, hence JSON strings in `tenax job --json`."""


def _int_fields(doc: dict) -> dict:
    for r in doc["recoveries"]:
        for name in _INT64_FIELDS:
            r[name] = int(r.get(name, 0))
        r.setdefault("old_layout", {})
        r.setdefault("new_layout", {})
    return doc


def job_doc(info: dict, job_id: str) -> dict:
    """`tenax job ID --json`: the user's view (workers with node/slot/pid, recoveries)."""
    out = tenax("job", job_id, "--json", "--controller", info["controller"], home=info["home"], timeout_s=30)
    return _int_fields(json.loads(out.stdout))


def job_doc_rpc(info: dict, job_id: str) -> dict:
    """What `tenax job ID --json` prints (its ``job_record``, without the events), read over gRPC
    from the test process: for polls. A CLI process per poll kept one of a 2-core host's cores
    busy starting Python, slowing the workers whose progress the poll waits for."""
    with controller_channel(info["controller"], info["security"]) as channel:
        job = pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
    return _int_fields(job_record(job))


def timeline(info: dict, job_id: str) -> list[dict]:
    """`tenax events ID --json`: the job's events, oldest first."""
    out = tenax("events", job_id, "--json", "--controller", info["controller"], home=info["home"], timeout_s=30)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def worker_logs(info: dict, tail_chars: int = 3000) -> str:
    """The end of every worker's and agent's log: what a failed assertion shows (a CI run's
    temp dirs are gone by the time anyone reads its output)."""
    local = Path(info["home"]) / "local"
    out = []
    for path in sorted([*local.glob("agents/*/jobs/*/rank-*.log"), *local.glob("logs/node-*.log")]):
        text = path.read_text(errors="replace")
        out.append(f"==== {path.relative_to(local)}\n{text[-tail_chars:]}")
    return "\n".join(out)


def pids_by_slot(doc: dict) -> dict[tuple[str, int], int]:
    return {(w["node"], w["slot"]): w["pid"] for w in doc["workers"] if w["pid"]}


def wait_step(info: dict, job_id: str, step: int, timeout_s: float = 90) -> dict:
    """The job (GetJob over gRPC: workers with node/slot/pid) once it is at ``step`` or later.
    Polled in-process every 50 ms, not through a CLI process per poll: on a loaded host a
    `tenax job` start can take seconds, and a 50-step job could finish before a fault lands."""
    def reached():
        doc = job_json(info, job_id)
        assert doc["phase"] not in ("FAILED", "CANCELLED"), doc["message"]
        return doc if doc["step"] >= step and all(w["pid"] for w in doc["workers"]) else None

    return wait_until(reached, timeout_s, f"job {job_id} at step {step}", interval_s=0.05)


def wait_recoveries(info: dict, job_id: str, count: int, timeout_s: float = 60) -> dict:
    """Until ``count`` recoveries are complete (total_s set) and the job runs (or is done)."""
    def done():
        doc = job_doc_rpc(info, job_id)
        assert doc["phase"] not in ("FAILED", "CANCELLED"), doc["message"]
        complete = [r for r in doc["recoveries"] if r.get("total_s", 0) > 0]
        return doc if len(complete) >= count and doc["phase"] in ("RUNNING", "SUCCEEDED") else None

    return wait_until(done, timeout_s, f"{count} recoveries of job {job_id}", interval_s=0.3)


def job_losses(info: dict, job_id: str) -> dict[int, float]:
    out = tenax("job", job_id, "--metrics", "--controller", info["controller"], home=info["home"], timeout_s=30)
    return {rec["step"]: rec["loss"] for line in out.stdout.splitlines() if line.strip()
            for rec in [json.loads(line)]}


def assert_same_curve(got: dict[int, float], reference: dict[int, float]) -> None:
    missing = sorted(set(reference) - set(got))
    assert not missing, f"steps without a loss: {missing}"
    bad = [(s, got[s], reference[s]) for s in sorted(reference)
           if not math.isclose(got[s], reference[s], rel_tol=RTOL, abs_tol=0.0)]
    assert not bad, f"{len(bad)} step(s) differ from the uninterrupted run (step, got, reference): {bad[:5]}"


def assert_recovered(doc: dict, *, count: int, max_steps_lost: int) -> list[dict]:
    assert doc["phase"] == "SUCCEEDED", (doc["message"], doc["workers"])
    recs = doc["recoveries"]
    assert len(recs) == count, recs
    for r in recs:
        assert r.get("total_s", 0) > 0 and r["steps_lost"] <= max_steps_lost, r
        print(f"recovery {r['cause']!r} g{r['generation']} "
              f"dp{r['old_layout'].get('dp')}pp{r['old_layout'].get('pp')} -> "
              f"dp{r['new_layout'].get('dp')}pp{r['new_layout'].get('pp')}: "
              f"detection {r.get('detection_s', 0):.3f} s, plan {r.get('plan_s', 0):.3f} s, "
              f"rebuild {r.get('rebuild_s', 0):.3f} s, transfer {r.get('transfer_s', 0):.3f} s, "
              f"total {r['total_s']:.3f} s, workers stalled {r.get('worker_total_s', 0):.3f} s, "
              f"prepare {r.get('prepare_s', 0):.3f} s, steps lost {r.get('steps_lost', 0)}, "
              f"bytes moved {r.get('bytes_moved', 0)}, local {r.get('bytes_local', 0)}")
    return recs


def assert_survivors_kept_their_pids(before: dict[tuple[str, int], int], after: dict[tuple[str, int], int],
                                     gone: set[tuple[str, int]]) -> None:
    for where, pid in after.items():
        if where in before and where not in gone:
            assert pid == before[where], f"the worker on {where} was restarted ({before[where]} -> {pid})"


def reference_losses(tmp: Path, steps: int) -> dict[int, float]:
    """Per-step losses of the spec without any fault: `tenax train-local` on one process. The
    layout does not change the losses (tests/trainer/test_trainer_layouts.py checks every layout
    against dp1pp1 within rtol 1e-5), and one process is the cheapest uninterrupted run. One
    intra-op thread (as bench/soak.py's reference): with torch's thread per core, every op of a
    lone process waits for its descheduled thread beside a busy process (50 steps took over
    180 s beside `yes`, 12 s with one thread)."""
    config = job_file(tmp, steps=steps, parallelism={"dp": 1, "pp": 1, "zero_stage": 0},
                      resources={"workers": 1, "device": "cpu"})
    metrics = tmp / "metrics.jsonl"
    tenax("train-local", "--nproc", "1", "--config", str(config), "--metrics", str(metrics),
          home=tmp / "home", timeout_s=180, env={"OMP_NUM_THREADS": "1"})
    losses = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("step"), int) and rec.get("loss") is not None:
            losses[rec["step"]] = rec["loss"]
    assert sorted(losses) == list(range(1, steps + 1))
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    return reference_losses(tmp_path_factory.mktemp("reference"), STEPS)


LONG_STEPS = 200
"""Tests that act twice by polling the CLI (a process per poll: two kills, a growth then a
drain): the job must still be running when the second action lands, whatever the host's load."""


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> dict[int, float]:
    return reference_losses(tmp_path_factory.mktemp("long-reference"), LONG_STEPS)


@contextlib.contextmanager
def extra_agent(info: dict, node: str, slots: int = 2, args: tuple[str, ...] = ()):
    """One more agent (a node joining mid-job), killed with its workers at the end."""
    state_dir = Path(info["state_dir"])
    log = open(state_dir / "logs" / f"{node}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "agent", "--etcd", info["etcd"], "--node-id", node,
         "--slots", str(slots), "--lease-ttl", str(TTL_S), "--work-dir", str(state_dir / "agents" / node),
         "--kill-grace=2", *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# ------------------------------------------------------------------ 1. kill -9 one worker
def test_kill_one_worker_survivors_keep_running_and_the_curve_is_unchanged(tmp_path, reference):
    with local_cluster(tmp_path) as info:
        job_id = submit(info, spec_file(tmp_path))
        before = wait_step(info, job_id, 8)
        pids = pids_by_slot(before)
        victim = next(w for w in before["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)

        wait_recoveries(info, job_id, 1)
        doc = job_doc(info, job_id)
        assert doc["generation"] == 2
        done = wait_job_done(info, job_id)
        assert done["phase"] == "SUCCEEDED", (done, worker_logs(info))
        doc = job_doc(info, job_id)
        rec, = assert_recovered(doc, count=1, max_steps_lost=1)
        assert rec["cause"] == "worker-failed" and rec["generation"] == 2
        assert rec["old_layout"] == {"dp": 2, "pp": 2, "zero_stage": 1}
        # the survivors' gloo error ("Connection closed by peer") is classified (common/comm_errors.py)
        # when it reached them first; when the agent's report and the new plan beat it (a survivor
        # between collectives), they switched on the plan and saw no error
        recovery = next(e for e in timeline(info, job_id) if e["kind"] == "recovery")
        if rec.get("comm_error"):
            assert rec["comm_error"] == "peer-died", rec
            assert "communication failed: peer-died (" in recovery["message"], recovery
            assert "peer-died" in recovery["data"]["comm_errors"].values(), recovery
        else:
            assert "communication failed" not in recovery["message"], recovery
        assert_survivors_kept_their_pids(pids, pids_by_slot(doc), {(victim["node"], victim["slot"])})
        assert (victim["node"], victim["slot"]) not in pids_by_slot(doc)
        assert_same_curve(job_losses(info, job_id), reference)


# ------------------------------------------------------------------ 2. kill -9 an agent
def test_kill_the_agent_of_the_metrics_rank_changes_the_layout_and_no_step_goes_missing(tmp_path, reference):
    """The node of the metrics rank (dp0 on the last stage: its step lines are the job's metrics)
    is lost with the steps its agent had not relayed yet (about a second's worth); a survivor
    re-sends its own records of them (controller.replan.metrics_backfill), so `tenax job
    --metrics` still has every step."""
    with local_cluster(tmp_path) as info:
        job_id = submit(info, spec_file(tmp_path))
        before = wait_step(info, job_id, 8)
        pids = pids_by_slot(before)
        victim = next(w["node"] for w in before["workers"] if w["rank"] == 1)  # dp0·pp1 of dp2·pp2
        other = ({"node-0", "node-1"} - {victim}).pop()
        os.kill(info["pids"][victim], signal.SIGKILL)  # its workers die with it (parent-death signal)
        lost = {where for where in pids if where[0] == victim}
        wait_until(lambda: not any(alive(pids[w]) for w in lost), 5, f"{victim}'s workers to die", interval_s=0.05)

        done = wait_job_done(info, job_id, timeout_s=120)
        doc = job_doc(info, job_id)
        assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))
        rec, = assert_recovered(doc, count=1, max_steps_lost=1)
        assert rec["cause"] == "node-lost"
        assert (rec["old_layout"]["dp"], rec["new_layout"]["dp"], rec["new_layout"]["pp"]) == (2, 1, 2)
        assert {w["node"] for w in doc["workers"]} == {other}
        assert_survivors_kept_their_pids(pids, pids_by_slot(doc), lost)
        assert rec["detection_s"] < TTL_S + 2, rec  # the lease TTL bounds it
        lost_event = next(e for e in timeline(info, job_id) if e["kind"] == "node-lost")
        assert lost_event["data"]["node"] == victim, lost_event
        assert lost_event["data"]["ranks"] == sorted(w["rank"] for w in before["workers"] if w["node"] == victim)
        plan = Plan.from_json(etcd_read(info["etcd"], lambda e: e.get(KEYS.job_plan(job_id))).value)
        assert plan.extra["metrics_backfill"] == {"node": other, "slot": plan.worker(1).slot}, plan.extra
        assert_same_curve(job_losses(info, job_id), reference)


# ------------------------------------------------------------------ 3. two failures in a row
def test_two_failures_one_after_the_other(tmp_path, long_reference):
    """dp4 (pure data parallel): 4 -> 3 -> 2 workers with uneven sample shares (6,5,5), the global
    batch unchanged; the same curve as the one-process reference (it does not depend on the layout).

    Straggler policy ``alert``: the subject is two failures. On a host shared with another busy
    process one worker can get less CPU than its peers for seconds; the detector then rightly
    rebalances the shares, a third (planned) plan generation this test does not count."""
    with local_cluster(tmp_path) as info:
        elastic = {"min_workers": 1, "max_workers": 4, "snapshot_every": "1", "straggler_policy": "alert"}
        job_id = submit(info, job_file(tmp_path, steps=LONG_STEPS, parallelism={"dp": 4, "pp": 1, "zero_stage": 1},
                                       elastic=elastic))
        before = wait_step(info, job_id, 5)
        first_pids = pids_by_slot(before)
        first = next(w for w in before["workers"] if w["rank"] == 1)
        os.kill(first["pid"], signal.SIGKILL)
        after_first = wait_recoveries(info, job_id, 1)
        second_doc = wait_step(info, job_id, after_first["step"] + 2)
        second_pids = pids_by_slot(second_doc)
        second = next(w for w in second_doc["workers"] if w["rank"] == 0)
        os.kill(second["pid"], signal.SIGKILL)

        done = wait_job_done(info, job_id, timeout_s=120)
        doc = job_doc(info, job_id)
        assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))
        recs = assert_recovered(doc, count=2, max_steps_lost=1)
        assert [r["generation"] for r in recs] == [2, 3]
        assert [r["new_layout"]["dp"] for r in recs] == [3, 2]
        gone = {(first["node"], first["slot"]), (second["node"], second["slot"])}
        assert_survivors_kept_their_pids(first_pids, pids_by_slot(doc), gone)
        assert_survivors_kept_their_pids(second_pids, pids_by_slot(doc), gone)
        assert_same_curve(job_losses(info, job_id), long_reference)


# ------------------------------------------------------------------ 3b. survivors first, then growth back
def test_a_failure_with_a_free_slot_trains_on_the_survivors_then_grows_back(tmp_path, long_reference):
    """Issue 16: with a free slot, the re-plan after a kill -9 still runs on the 3 survivors alone
    (dp1·pp3, switch now): a new worker in it would make them wait for its process start. The
    two-phase growth then starts the new worker while the job trains and brings the job back
    to dp2·pp2 at a step boundary. Straggler policy ``alert``: the subject is the failure and
    the growth (see test_two_failures_one_after_the_other)."""
    with local_cluster(tmp_path, agents=3) as info:
        elastic = {"min_workers": 1, "max_workers": 4, "snapshot_every": "1", "straggler_policy": "alert"}
        job_id = submit(info, job_file(tmp_path, steps=LONG_STEPS, elastic=elastic))
        before = wait_step(info, job_id, 8)
        pids = pids_by_slot(before)
        victim = next(w for w in before["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)

        grown = wait_recoveries(info, job_id, 2, timeout_s=120)
        assert (grown["layout"]["dp"], grown["layout"]["pp"]) == (2, 2), grown["recoveries"]
        done = wait_job_done(info, job_id, timeout_s=180)
        doc = job_doc(info, job_id)
        assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))
        failed, grow = assert_recovered(doc, count=2, max_steps_lost=1)
        assert failed["cause"] == "worker-failed" and grow["cause"] == "grow" and grow["steps_lost"] == 0
        assert (failed["new_layout"]["dp"], failed["new_layout"]["pp"]) == (1, 3)
        assert (grow["new_layout"]["dp"], grow["new_layout"]["pp"]) == (2, 2)
        # the survivors trained again before the new worker's process was even ready
        assert failed["total_s"] < grow["prepare_s"], (failed, grow)
        events = timeline(info, job_id)
        recovery = next(e for e in events if e["kind"] == "recovery" and e["data"]["generation"] == 2)
        assert recovery["data"]["survivors_only"] is True, recovery
        assert "grows back to dp=2·pp=2 (4 workers)" in recovery["data"]["survivors_reason"], recovery
        plan2 = next(e for e in events if e["kind"] == "plan" and e["data"]["generation"] == 2)
        assert "survivors first: the 3 survivors run dp=1·pp=3 now" in plan2["data"]["reason"], plan2
        # every survivor kept its process through both changes; the killed slot stayed out
        assert len(doc["workers"]) == 4 and (victim["node"], victim["slot"]) not in pids_by_slot(doc)
        assert_survivors_kept_their_pids(pids, pids_by_slot(doc), {(victim["node"], victim["slot"])})
        assert_same_curve(job_losses(info, job_id), long_reference)


# ------------------------------------------------------------------ 3c. the node holding every copy is lost
def test_losing_the_node_that_holds_every_copy_resumes_from_the_shared_disk_a_step_back(tmp_path, reference):
    """Issue 16: both ranks run on node-0, so each rank's buddy replica is on node-0 too and the
    in-memory copies do not survive that node. The trainer then writes every snapshot it can to
    the shared checkpoint directory (`tenax up` gives every agent one), the job status says what a
    node loss would cost, and when node-0 is lost the job resumes on node-1 from disk a few steps
    back (the writer takes a snapshot after resting as long as its last write took: a step or two
    on a quiet host, ~5 beside a busy process), not from the last ``checkpoint_every`` multiple
    (here: none yet, so step 0: at least 20 steps lost)."""
    with local_cluster(tmp_path, agents=1) as info:
        shared = Path(info["state_dir"]) / "checkpoints"
        path = job_file(tmp_path, steps=STEPS, parallelism={"dp": 2, "pp": 1, "zero_stage": 1},
                        resources={"workers": 2, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": 2, "snapshot_every": "1",
                                 "straggler_policy": "alert"})
        job_id = submit(info, path)
        with extra_agent(info, "node-1", args=("--checkpoint-dir", str(shared))):
            wait_until(lambda: nodes(info).get("node-1"), 30, "node-1 to register")
            at_risk = wait_step(info, job_id, 20)
            doc = job_doc(info, job_id)
            assert "a node loss: about" in doc["next_failure_cost"] and "from disk" in doc["next_failure_cost"], doc
            assert (shared / job_id).is_dir() and any((shared / job_id).glob("step-*/g1-r*/done")), \
                sorted(p.name for p in (shared / job_id).glob("*"))
            killed_at = job_json(info, job_id)["step"]
            os.kill(info["pids"]["node-0"], signal.SIGKILL)  # both workers die with their agent
            lost = set(pids_by_slot(at_risk))
            wait_until(lambda: not any(alive(at_risk_pid) for at_risk_pid in pids_by_slot(at_risk).values()), 5,
                       "node-0's workers to die", interval_s=0.05)

            done = wait_job_done(info, job_id, timeout_s=150)
            doc = job_doc(info, job_id)
            assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))
            rec, = assert_recovered(doc, count=1, max_steps_lost=10)
            assert rec["cause"] == "node-lost" and rec.get("from_disk") is True, rec
            # no rank survived to know the step: the controller's view of it counts the steps redone
            assert rec["at_step"] >= killed_at, (rec, killed_at)
            assert {w["node"] for w in doc["workers"]} == {"node-1"} and not lost & set(pids_by_slot(doc))
            # The lost node's last step lines may never have been relayed (its agent relays them about
            # once a second, later under load) and those steps are not redone (their state came back
            # from disk): the checkpoint kept the metrics rank's recent step lines, and the new
            # metrics rank re-wrote them (``replayed``), so every step has the reference's loss.
            assert_same_curve(job_losses(info, job_id), reference)


# ------------------------------------------------------------------ 4. growth, then a drain
def test_growth_to_four_workers_then_drain_lose_no_step(tmp_path, long_reference):
    """Two-phase growth: the new node's workers are started and ready before plan 2 is written
    (the job trains on plan 1 meanwhile), so the survivors stall at the switch only for the
    rendezvous and the transfer; then a drain moves everything to the new node.

    Straggler policy ``alert``: the subject is growth and drain. On a host shared with another
    busy process a worker can get less CPU than its peers for seconds, and the detector then
    rightly rebalances the shares: a third (planned) plan generation this test does not count."""
    with local_cluster(tmp_path, agents=1) as info:
        path = job_file(tmp_path, steps=LONG_STEPS, parallelism={"dp": 1, "pp": 2, "zero_stage": 1}, resources={
            "workers": 2, "device": "cpu"}, elastic={"min_workers": 1, "max_workers": 4, "snapshot_every": "1",
                                                     "straggler_policy": "alert"})
        job_id = submit(info, path)
        start = wait_step(info, job_id, 3)
        first_pids = pids_by_slot(start)
        with extra_agent(info, "node-1"):
            grown = wait_recoveries(info, job_id, 1)
            assert (grown["layout"]["dp"], grown["layout"]["pp"]) == (2, 2)
            assert_survivors_kept_their_pids(first_pids, pids_by_slot(grown), set())
            new_pids = {w: p for w, p in pids_by_slot(grown).items() if w[0] == "node-1"}

            tenax("nodes", "drain", "node-0", "--controller", info["controller"], home=info["home"])
            done = wait_job_done(info, job_id, timeout_s=120)
            doc = job_doc(info, job_id)
            assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))
            grow_rec, drain_rec = assert_recovered(doc, count=2, max_steps_lost=0)
            assert grow_rec["cause"] == "grow" and drain_rec["cause"] == "drain node-0"
            # the joiners were ready before the plan switched; they received their state over the wire
            assert grow_rec["prepare_s"] > 0 and grow_rec["bytes_moved"] > 0, grow_rec
            assert grow_rec["worker_total_s"] > 0 and drain_rec["worker_total_s"] > 0
            # the drained node's state came from the buddy replicas the new node held, or over the wire
            assert drain_rec["bytes_moved"] + drain_rec["bytes_local"] > 0, drain_rec
            assert {w["node"] for w in doc["workers"]} == {"node-1"}
            assert_survivors_kept_their_pids(new_pids, pids_by_slot(doc), set())
            events = timeline(info, job_id)
            growth = [(e["data"]["state"], e["data"]["joiners"]) for e in events if e["kind"] == "growth"]
            assert growth[:2] == [("PREPARING", ["node-1/0", "node-1/1"]), ("COMMITTED", ["node-1/0", "node-1/1"])], \
                growth
            assert any(e["kind"] == "drain" and e["data"]["node"] == "node-0" for e in events), events
            assert_same_curve(job_losses(info, job_id), long_reference)


# ------------------------------------------------------------------ 5. growth that never gets ready
def test_a_growth_whose_new_workers_never_get_ready_is_abandoned_and_leaves_no_process(tmp_path):
    """The joining node's workers hang before they are ready (a worker command that only sleeps):
    the controller abandons the growth after --growth-prepare-s, the agent stops them, and the
    job never stalls: it keeps training on plan 1."""
    import psutil

    hang = f"{sys.executable} -c 'import time; time.sleep(300)'"
    with local_cluster(tmp_path, agents=1, controller_args=["--growth-prepare-s=4"]) as info:
        path = job_file(tmp_path, steps=400, parallelism={"dp": 1, "pp": 2, "zero_stage": 1},
                        resources={"workers": 2, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": 4, "snapshot_every": "1"})
        job_id = submit(info, path)
        wait_step(info, job_id, 2)
        with extra_agent(info, "node-1", args=(f"--worker-command={hang}",)) as agent:
            def prepared():
                kids = []
                for p in psutil.Process(agent.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "time.sleep(300)" in " ".join(p.cmdline()):
                            kids.append(p)
                return kids if len(kids) == 2 else None

            sleepers = wait_until(prepared, 60, "node-1's two new workers", interval_s=0.1)
            growth = wait_until(lambda: _growth(info, job_id, "ABANDONED"), 30, "the growth to be abandoned")
            assert "not ready within 4 s" in growth["reason"], growth
            wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sleepers),
                       15, "the new workers to be stopped", interval_s=0.1)
            doc = job_doc(info, job_id)
            assert doc["generation"] == 1 and doc["phase"] == "RUNNING" and doc["recoveries"] == [], doc
            # not stuck: it keeps training on plan 1 (the next attempt waits 30 s: the test ends first)
            after = wait_step(info, job_id, doc["step"] + 2)
            assert after["generation"] == 1 and after["phase"] == "RUNNING"


def _growth(info: dict, job_id: str, state: str) -> dict | None:
    import asyncio

    from common.etcd import Etcd
    from protos.keys import Keys

    async def read():
        async with Etcd(info["etcd"]) as etcd:
            return await etcd.get(Keys().job_growth(job_id))

    kv = asyncio.run(asyncio.wait_for(read(), 10))
    growth = json.loads(kv.value) if kv is not None else None
    return growth if growth is not None and growth["state"] == state else None
