"""End to end: `tenax up` without --slots lets each agent take its slot count from its GPUs
(``--fake-gpu-dir`` in place of NVML), every slot names its device(s) in `tenax nodes --json`,
and an agent asked for more slots than its GPUs give without a map refuses to start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.test_e2e_cluster import local_cluster, tenax

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_slots_follow_the_gpus_and_name_their_devices(tmp_path):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    (gpus / "node-0.json").write_text(json.dumps([{"name": "H100"}] * 3))
    (gpus / "node-1.json").write_text(json.dumps([{"name": "H100"}] * 4))
    with local_cluster(tmp_path, agents=2, slots=None, agent_args=[f"--fake-gpu-dir={gpus}"]) as info:
        doc = {n["id"]: n for n in json.loads(tenax("nodes", "--json", "--controller", info["controller"],
                                                    home=info["home"]).stdout)}
        assert doc["node-0"]["slots"] == 3 and doc["node-0"]["slot_devices"] == ["0", "1", "2"]
        assert doc["node-1"]["slots"] == 4 and doc["node-1"]["slot_devices"] == ["0", "1", "2", "3"]


def test_an_agent_never_points_a_slot_at_a_missing_gpu(tmp_path):
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    (gpus / "n.json").write_text(json.dumps([{"name": "H100"}]))
    base = [sys.executable, "-m", "cli.main", "agent", "--etcd", "http://127.0.0.1:9", "--node-id", "n",
            "--fake-gpu-dir", str(gpus), "--work-dir", str(tmp_path / "w")]
    refused = subprocess.run(base + ["--slots", "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--slot-devices (e.g. 0;0)" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
