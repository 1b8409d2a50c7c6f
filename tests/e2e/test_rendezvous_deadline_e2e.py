"""End to end, issue 16 ("no stall without a deadline"): a participant of a new plan generation
is alive but never reaches the rendezvous; the controller abandons the generation after a
deadline derived from the job's measured worker start-up and step times, re-plans around it
(its slot quarantined as a failure), says why in a ``rendezvous-timeout`` event, and the job
finishes.

Real etcd, controller, agents and workers (gloo). The fault: ``kind=hang-join,gen=2``
(trainer/faults.py) in every worker's environment holds the worker *started for* generation 2
(the replacement of a killed worker, on the free third slot) before its rendezvous, for ever;
the survivor waits there for it. Workers started for generation 1 are not affected. Generation
3 has no free slot left (both others are quarantined): the survivor trains on alone, at once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.test_e2e_cluster import job_file, submit, wait_job_done, wait_until
from tests.e2e.test_e2e_elastic import job_doc, job_doc_rpc, pids_by_slot, timeline, wait_step, worker_logs
from tests.helpers.health_e2e_helpers import FAST_DETECTION_ARGS, cluster_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FLOOR_S, CAP_S, FACTOR, STEP_K = 3.0, 40.0, 1.0, 5.0
"""Factor 1: the only rank that must arrive in time is the survivor, which arrives first (the
deadline runs from the first arrival); no legitimately slow new worker needs a margin here."""
STEPS = 20
"""The kill lands at step 5; the generations after it need only a few steps to show that the job
trains on and finishes (every step past them was the survivor alone, checking nothing more)."""
HANG_ARGS = ("--hang-floor-s=15",)
"""The hang detector is not this test's subject: beside a busy process the lone survivor of
generation 3 once stalled 4 s between two ~0.3 s steps, and the fast-detection floor (4 s) had it
killed as hung (no worker left: the job failed)."""
RENDEZVOUS_ARGS = (f"--rendezvous-floor-s={FLOOR_S}", f"--rendezvous-cap-s={CAP_S}",
                   f"--rendezvous-startup-factor={FACTOR}", f"--rendezvous-step-k={STEP_K}")


def test_a_worker_that_never_joins_its_generation_is_replanned_around_within_the_derived_deadline(tmp_path):
    env = {"TENAX_FAULT": "kind=hang-join,gen=2,rank=-1"}
    with cluster_with_env(tmp_path, env, controller_args=(*FAST_DETECTION_ARGS, *HANG_ARGS, *RENDEZVOUS_ARGS),
                          agents=1, slots=3) as info:
        # two workers on three slots: a failure is re-planned onto the free one (a new worker): the
        # survivor alone would need a 1-stage layout, larger per worker than the spec's 2 stages
        spec = job_file(tmp_path, steps=STEPS, parallelism={"dp": 1, "pp": 2, "zero_stage": 1},
                        resources={"workers": 2, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": 2, "snapshot_every": "1"})
        job_id = submit(info, spec)
        before = wait_step(info, job_id, 5)
        victim = next(w for w in before["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()

        # generation 2: the survivor and a new worker on a free slot, which hangs before it joins
        def held_joiner():
            doc = job_doc_rpc(info, job_id)
            assert doc["phase"] not in ("FAILED", "CANCELLED"), doc["message"]
            if doc["generation"] != 2:
                return None
            new = [w for w in doc["workers"] if (w["node"], w["slot"]) not in pids_by_slot(before) and w["pid"]]
            return new[0] if new else None

        joiner = wait_until(held_joiner, 60, "generation 2 with a new worker", interval_s=0.2)
        hung_pid = joiner["pid"]

        done = wait_job_done(info, job_id, timeout_s=120)
        doc = job_doc(info, job_id)
        assert done["phase"] == "SUCCEEDED", (doc["message"], worker_logs(info))

        # the why: one rendezvous-timeout event naming the rank, node, slot and the deadline used
        events = timeline(info, job_id)
        [event] = [e for e in events if e["kind"] == "rendezvous-timeout"]
        data = event["data"]
        assert (data["node"], data["slot"], data["generation"]) == (joiner["node"], joiner["slot"], 2), event
        assert data["rank"] == joiner["rank"]
        deadline = data["deadline_s"]
        assert FLOOR_S <= deadline <= CAP_S and deadline < CAP_S, event  # derived, not the cap
        assert data["waited_s"] >= deadline
        assert f"{FACTOR:g} x slowest start-up" in data["decision"], data["decision"]
        print(f"rendezvous deadline {deadline:.1f} s ({data['decision']}); "
              f"gave up after {data['waited_s']:.1f} s")

        # abandoned within the deadline (plus one health pass and the survivor's arrival), then re-planned
        recs = doc["recoveries"]
        assert [r["generation"] for r in recs] == [2, 3], recs
        assert recs[1]["cause"].startswith(f"rendezvous-timeout: rank {joiner['rank']} on {joiner['node']} "
                                           f"slot {joiner['slot']} did not reach the rendezvous of generation 2"), recs
        # the deadline runs from the survivor's arrival, a second or so after the kill
        replanned_after = recs[1]["time"] - killed_at
        assert deadline < replanned_after < deadline + 8, (replanned_after, deadline, recs)
        assert all(r["steps_lost"] <= 1 for r in recs), recs
        # the slot that never joined is quarantined: generation 3 runs without it, on the survivor
        assert recs[1]["new_layout"]["dp"] * max(recs[1]["new_layout"].get("pp", 1), 1) == 1, recs
        assert (joiner["node"], joiner["slot"]) not in pids_by_slot(doc)
        assert hung_pid not in {w["pid"] for w in doc["workers"]}
