"""End to end: XID telemetry injected into a running agent (its GPU source reads a
file the test writes, ``tenax agent --fake-gpu-dir``) -> the node reports DEGRADED -> the
leader's health loop drains it -> the job's worker there moves to the spare node
at a step boundary (plan g+1 with switch_at_step), no step lost, and the job
finishes."""

from __future__ import annotations

import json

import pytest

from protos import tenax_pb2 as pb
from protos.plan import Plan
from tests.helpers.health_e2e_helpers import cluster_with_env, get_job
from tests.e2e.test_e2e_cluster import (KEYS, etcd_read, job_file, nodes, submit, tenax, wait_job_done,
                                        wait_job_step, wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# Long enough that the drain's step-boundary switch lands before the job ends,
# also when detection is slow on a loaded host (a switch past the last step is refused).
STEPS = 200


def test_injected_xid_degrades_the_node_and_its_worker_migrates_without_losing_a_step(tmp_path):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    with cluster_with_env(tmp_path, {}, agents=3, slots=1,
                          agent_args=[f"--fake-gpu-dir={gpus}"]) as info:
        path = job_file(tmp_path, steps=STEPS, parallelism={"dp": 2, "pp": 1, "zero_stage": 1},
                        resources={"workers": 2, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": 2, "snapshot_every": "1"})
        job_id = submit(info, path)
        job = wait_job_step(info, job_id, 8, timeout_s=120)
        victim = next(w["node"] for w in job["workers"] if w["rank"] == 1)
        spare = ({"node-0", "node-1", "node-2"} - {w["node"] for w in job["workers"]}).pop()

        # an XID 13 (graphics engine exception): not fatal, the GPU is suspect -> DEGRADED
        (gpus / f"{victim}.json").write_text(json.dumps([{"name": "H200", "xid_events": [13]}]))

        def degraded():
            n = nodes(info)[victim]
            return pb.NodeCondition.Name(n.condition) == "DEGRADED" and pb.NodeState.Name(n.state) == "CORDONED"

        wait_until(degraded, 20, f"{victim} DEGRADED and cordoned", interval_s=0.3)

        def moved() -> Plan | None:
            plan = Plan.from_json(etcd_read(info["etcd"], lambda e: e.get(KEYS.job_plan(job_id))).value)
            return plan if victim not in {w.node for w in plan.workers} else None

        plan = wait_until(moved, 60, f"a plan without {victim}", interval_s=0.3)
        assert plan.switch_at_step >= 0, "a planned migration switches at a step boundary"
        assert spare in {w.node for w in plan.workers}

        done = wait_job_done(info, job_id, timeout_s=150)
        assert done["phase"] == "SUCCEEDED", (done["message"], done["workers"])
        status = get_job(info, job_id).status
        print("recoveries:", [(r.cause, r.generation, r.at_step, round(r.total_s, 2), r.steps_lost)
                              for r in status.recoveries])
        moves = [r for r in status.recoveries if r.generation == plan.generation]
        assert moves and all(r.steps_lost == 0 for r in moves), list(status.recoveries)
        assert status.step == STEPS

        # the why, in the job's timeline: the XID the agent saw, the drain that followed, the move
        out = tenax("events", job_id, "--json", "--controller", info["controller"], home=info["home"]).stdout
        timeline = [json.loads(line) for line in out.splitlines() if line.strip()]
        xid = next(e for e in timeline if e["kind"] == "xid")
        assert xid["data"]["node"] == victim and xid["data"]["xids"] == [13] and "XID 13" in xid["message"], xid
        drain = next(e for e in timeline if e["kind"] == "drain")
        assert drain["data"]["node"] == victim, drain
        kinds = [e["kind"] for e in timeline]
        assert kinds.index("xid") < kinds.index("drain") < max(i for i, k in enumerate(kinds) if k == "plan"), kinds

