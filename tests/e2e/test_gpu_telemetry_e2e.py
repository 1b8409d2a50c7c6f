"""End to end: GPU telemetry from a real agent (``--fake-gpu-dir`` in place of NVML) reaches
`tenax nodes` / `tenax nodes --json` with every field the agent samples, and the agent's XID
counter exists at 0 before the first XID, so the first XID it scrapes fires the
TenaxGPUXidErrors rule (promtool, on the values scraped from the agent)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from tests.e2e.test_e2e_cluster import local_cluster, nodes, tenax, wait_until
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

GPU = {"name": "NVIDIA H200", "utilization": 37.0, "memory_used": 12 * 1024 ** 3, "memory_total": 141 * 1024 ** 3,
       "temperature_c": 61.0, "power_w": 433.0, "sm_clock_mhz": 1755.0, "throttle_reasons": ["sw_power_cap"],
       "ecc_volatile_dbe": 0, "retired_pages": 0, "xid_events": [], "remapped_rows_pending": 1,
       "remapped_rows_failed": 0, "pcie_replay_errors": 7, "nvlink_errors": 3, "xid_total": 0}


def xid_counter(address: str) -> float | None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('tenax_gpu_xid_errors_total{gpu="0"}'):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_gpu_telemetry_in_tenax_nodes_and_the_first_xid_fires_the_alert(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's 'prometheus' package (make system-deps)"
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    (gpus / "node-0.json").write_text(json.dumps([GPU]))
    with local_cluster(tmp_path, agents=1, slots=1,
                       agent_args=[f"--fake-gpu-dir={gpus}", "--telemetry-interval=0.3"]) as info:
        run = ("--controller", info["controller"])

        def sampled():
            doc = json.loads(tenax("nodes", "--json", *run, home=info["home"]).stdout)
            return doc[0] if doc[0]["health"].get("gpus") else None

        node = wait_until(sampled, 30, "the agent's first GPU sample in `tenax nodes --json`", interval_s=0.5)
        [gpu] = node["health"]["gpus"]
        assert gpu == {"index": 0, **GPU}, gpu  # every field the agent samples, with its value and type
        assert node["health"]["memory_total"] > 0 and node["health"]["time"] > 0
        text = tenax("nodes", *run, home=info["home"]).stdout
        line = next(line for line in text.splitlines() if line.strip().startswith("gpu 0"))
        for part in ("NVIDIA H200", "12.0/141.0 GiB", "37%", "61°C", "433 W", "THROTTLE=sw_power_cap",
                     "REMAP-PENDING", "PCIE-REPLAYS=7", "NVLINK-ERRORS=3"):
            assert part in line, (part, line)

        address = nodes(info)["node-0"].address
        before = xid_counter(address)
        assert before == 0.0, "the XID counter must exist at 0 before the first XID"
        (gpus / "node-0.json").write_text(json.dumps([{**GPU, "xid_events": [13]}]))
        wait_until(lambda: xid_counter(address) == 1.0, 10, "the first XID counted", interval_s=0.2)
        after = xid_counter(address)

    # the scraped values, one scrape a minute: 3 before the XID, then after it. A series that
    # only appears with the XID (gpu 1, as before this change) cannot fire: no increase to see.
    rules = yaml.safe_load((REPO / "ops" / "prometheus" / "alerts.yaml").read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TenaxGPUXidErrors")
    tests = {"rule_files": [str(REPO / "ops" / "prometheus" / "alerts.yaml")], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": [
                 {"series": 'tenax_gpu_xid_errors_total{instance="node-0", gpu="0"}',
                  "values": " ".join([f"{before:g}"] * 3 + [f"{after:g}"] * 8)},
                 {"series": 'tenax_gpu_xid_errors_total{instance="node-0", gpu="1"}',
                  "values": " ".join(["_"] * 3 + [f"{after:g}"] * 8)}],
                 "alert_rule_test": [{"eval_time": "5m", "alertname": "TenaxGPUXidErrors", "exp_alerts": [{
                     "exp_labels": {"severity": rule["labels"]["severity"], "instance": "node-0", "gpu": "0"},
                     "exp_annotations": {
                         "summary": "XID errors on GPU 0 of node-0",
                         "description": "GPU 0 on node-0 reported 1 XID error(s) in the last 10 minutes.",
                         "runbook_url": rule["annotations"]["runbook_url"]}}]}]}]}
    path = tmp_path / "xid_test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
