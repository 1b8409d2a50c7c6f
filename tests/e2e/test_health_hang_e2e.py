"""End to end: `tenax chaos hang` SIGSTOPs one worker of a running job; the leader's
health loop declares it hung (no progress for max(k x median step, floor)), kills
it through its agent, and the job recovers (plan g+1) and finishes."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.helpers.health_e2e_helpers import (chaos, cluster_with_env, controller_metrics_address,
                                      get_job, metric_value, scrape)
from tests.e2e.test_e2e_cluster import alive, job_file, submit, wait_job_done, wait_job_step, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_sigstopped_rank_is_declared_hung_killed_and_the_job_recovers(tmp_path):
    with cluster_with_env(tmp_path, {}) as info:
        job_id = submit(info, job_file(tmp_path, steps=30))
        job = wait_job_step(info, job_id, 5)
        victim = next(w for w in job["workers"] if w["rank"] == 1)

        reply = chaos(info, "hang", "--job", job_id, "--rank", "1")
        assert reply["node"] == victim["node"]
        stopped_at = time.monotonic()
        wait_until(lambda: psutil.Process(victim["pid"]).status() == psutil.STATUS_STOPPED, 5,
                   "the victim to be stopped", interval_s=0.05)

        # declared hung and killed: floor 4 s (steps are far shorter), one health pass, one agent write
        wait_until(lambda: not alive(victim["pid"]), 20, "the hung worker to be killed", interval_s=0.1)
        killed_after = time.monotonic() - stopped_at
        text = scrape(controller_metrics_address(info))
        assert metric_value(text, "tenax_hangs_detected_total", job=job_id) == 1.0
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
