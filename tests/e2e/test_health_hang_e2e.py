"""End to end: `tenax chaos hang` SIGSTOPs one worker of a running job; the leader's
health loop declares it hung (no progress for max(k x median step, floor)), kills
it through its agent, and the job recovers (plan g+1) and finishes. The why is kept:
the job's events (hang with its evidence, the worker's exit with the root cause, the
plan, the recovery, the phases) and the recovery record's cause say hang, not kill."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from tests.helpers.health_e2e_helpers import (chaos, cluster_with_env, controller_metrics_address,
                                      get_job, metric_value, scrape)
from tests.e2e.test_e2e_cluster import (alive, job_file, submit, tenax, wait_job_done, wait_job_step,
                                        wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD


def test_sigstopped_rank_is_declared_hung_killed_and_the_job_recovers(tmp_path):
    with cluster_with_env(tmp_path, {}) as info:
        job_id = submit(info, job_file(tmp_path, steps=30))
        job = wait_job_step(info, job_id, 5)
        victim = next(w for w in job["workers"] if w["rank"] == 1)

        stopped_at = time.monotonic()  # before the CLI call: under load its exit alone can take seconds
        reply = chaos(info, "hang", "--job", job_id, "--rank", "1")
        assert reply["node"] == victim["node"]
        # stopped (or, on a host loaded enough that the CLI took longer than the hang floor to
        # exit, already declared hung and killed: the assertions below check that it was)
        wait_until(lambda: not alive(victim["pid"]) or _status(victim["pid"]) == psutil.STATUS_STOPPED, 5,
                   "the victim to be stopped", interval_s=0.05)

        # declared hung and killed: floor 4 s (steps are far shorter), one health pass, one agent write
        wait_until(lambda: not alive(victim["pid"]), 20, "the hung worker to be killed", interval_s=0.1)
        killed_after = time.monotonic() - stopped_at
        text = scrape(controller_metrics_address(info))
        assert metric_value(text, "tenax_hangs_detected_total", job=job_id) == 1.0
        assert 0 < metric_value(text, "tenax_job_goodput_ratio", job=job_id) < 1
        assert metric_value(text, "tenax_job_time_lost_seconds", job=job_id, cause="pending") > 0
        print(f"SIGSTOP -> declared hung and killed after {killed_after:.1f} s")
        assert killed_after < 15, killed_after

        done = wait_job_done(info, job_id, timeout_s=150)
        assert done["phase"] == "SUCCEEDED", (done["message"], done["workers"])
        status = get_job(info, job_id).status
        assert status.generation >= 2, "no new plan generation after the kill"
        assert status.recoveries, "no recovery recorded"
        print("recoveries:", [(r.cause, r.generation, round(r.total_s, 2), r.steps_lost) for r in status.recoveries])
        finished = [w for w in status.workers if w.state == "EXITED"]
        assert finished and all(w.pid != victim["pid"] for w in finished), "the hung worker finished the job?"

        # the root cause, not the kill that followed it
        hang_recovery = status.recoveries[0]
        assert hang_recovery.cause.startswith("hang: rank 1 made no progress for "), hang_recovery.cause
        assert hang_recovery.cause.endswith(", stopped by SIGSTOP; killed"), hang_recovery.cause
        silent = float(hang_recovery.cause.split("for ")[1].split(" s")[0])
        assert 4.0 <= silent < 15, hang_recovery.cause  # the floor is 4 s

        # the timeline: `tenax job --json` and `tenax events --json`
        doc = json.loads(tenax("job", job_id, "--json", "--controller", info["controller"], home=info["home"]).stdout)
        kinds = [e["kind"] for e in doc["events"]]
        out = tenax("events", job_id, "--json", "--controller", info["controller"], home=info["home"]).stdout
        timeline = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert [e["kind"] for e in timeline][-len(kinds):] == kinds
        hang = next(e for e in timeline if e["kind"] == "hang")
        assert hang["data"]["rank"] == 1 and hang["data"]["node"] == victim["node"], hang
        assert hang["data"]["process_stopped"] is True and hang["data"]["silent_s"] >= hang["data"]["timeout_s"]
        assert hang["step"] >= 5 and "kill rank 1" in hang["action"], hang
        exit_event = next(e for e in timeline if e["kind"] == "worker-exit")
        assert exit_event["data"]["signal"] == "SIGKILL" and exit_event["data"]["pid"] == victim["pid"]
        assert exit_event["data"]["cause"] == hang_recovery.cause, exit_event
        recovery = next(e for e in timeline if e["kind"] == "recovery")
        assert recovery["data"]["cause"] == hang_recovery.cause and "hang: rank 1" in recovery["message"]
        plans = [e for e in timeline if e["kind"] == "plan"]
        assert [p["generation"] for p in plans][:2] == [1, 2], plans
        phases = [(e["data"]["from"], e["data"]["to"]) for e in timeline if e["kind"] == "phase"]
        assert phases[0] == ("PENDING", "RUNNING") and ("RUNNING", "RECOVERING") in phases, phases
        assert phases[-1][1] == "SUCCEEDED", phases
        order = [e["kind"] for e in timeline]
        assert order.index("hang") < order.index("worker-exit") < order.index("recovery"), order
        shown = tenax("job", job_id, "--controller", info["controller"], home=info["home"]).stdout
        assert "hang" in shown and "made no progress" in shown, shown

        # goodput: the recovery's MTTR, the hang before it (a stall) and the rest add up to the wall time
        g = status.goodput
        assert 0 < g.ratio < 1 and g.ratio == pytest.approx(g.productive_s / g.wall_s)
        assert g.wall_s == pytest.approx(status.updated - status.created, abs=1e-3)
        assert g.recovery_s == pytest.approx(sum(r.total_s for r in status.recoveries if r.cause.startswith("hang")),
                                             abs=1e-6), (g, status.recoveries)
        assert g.recovery_s > 0 and g.pending_s > 0
        assert g.stall_s >= 0.8 * silent - g.recovery_s, g  # the rank stood still before it was declared hung
        assert g.productive_s + g.pending_s + g.recovery_s + g.replayed_s + g.stall_s == pytest.approx(g.wall_s)
        assert "goodput    ETTR" in shown, shown
