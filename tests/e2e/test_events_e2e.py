"""End to end: the why of a failure reaches the user. A job whose workers fail before their
first step (an exception in the worker) ends FAILED with a message that ends with the
failing worker's last exception line, and its timeline has the worker-exit events."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from tests.e2e.test_e2e_cluster import job_file, local_cluster, submit, tenax, wait_job_done

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ERROR = "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:29500"
CRASHING_WORKER = [sys.executable, "-c",
                   "import os, sys; print('worker of rank', os.environ['TENAX_RANK'], flush=True); "
                   "sys.stderr.write('Traceback (most recent call last):\\n  File \"worker.py\", line 1\\n"
                   f"{ERROR}\\n'); sys.exit(1)"]


def test_a_job_that_fails_before_its_first_step_says_why(tmp_path):
    with local_cluster(tmp_path, agents=1, slots=2,
                       agent_args=[f"--worker-command={shlex.join(CRASHING_WORKER)}"]) as info:
        job_id = submit(info, job_file(tmp_path, parallelism={"dp": 2, "pp": 1, "zero_stage": 1},
                                       resources={"workers": 2, "device": "cpu"},
                                       elastic={"min_workers": 1, "max_workers": 2, "snapshot_every": "1"}))
        done = wait_job_done(info, job_id, timeout_s=120)
        assert done["phase"] == "FAILED", done
        assert done["message"].endswith(f"last error: {ERROR}"), done["message"]

        doc = json.loads(tenax("job", job_id, "--json", "--events", "50", "--controller", info["controller"],
                               home=info["home"]).stdout)
        exits = [e for e in doc["events"] if e["kind"] == "worker-exit"]
        assert exits, doc["events"]
        assert all(e["data"]["last_error"] == ERROR and e["data"]["exit_code"] == 1 for e in exits), exits
        assert ERROR in exits[0]["message"]
        phases = [e["data"]["to"] for e in doc["events"] if e["kind"] == "phase"]
        assert phases[-1] == "FAILED", doc["events"]
