"""A real Prometheus (Debian `prometheus`) scrapes a LIVE local cluster: the
controller's and every agent's /metrics, found from `tenax up --detach`'s state
(controller metrics port) and ListNodes (agent HTTP addresses); a job runs and
a rank is slowed with `tenax chaos slow`, so detection metrics show up. The
alert rules load and evaluate without errors against what the cluster exports.

tests/ops/test_ops_prometheus.py does the same against synthetic values of every
metric; this one proves the live processes export what the rules expect.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.helpers.health_e2e_helpers import chaos, cluster_with_env, controller_metrics_address
from tests.e2e.test_e2e_cluster import job_file, nodes, submit, wait_job_step
from tests.ops.test_ops import ALERTS, _alert_rules
from tests.ops.test_ops_prometheus import _api, _free_port, _wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def scrape_config(controller_metrics: str, agents: list[str]) -> dict:
    """Prometheus config for one live cluster; `honor_labels` keeps the Tenax `job` label."""
    return {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "tenax-controller", "honor_labels": True,
             "static_configs": [{"targets": [controller_metrics]}]},
            {"job_name": "tenax-agent", "honor_labels": True, "static_configs": [{"targets": agents}]},
        ],
    }


def test_prometheus_scrapes_a_live_cluster_and_the_alert_rules_evaluate(tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: install Debian's 'prometheus' package (make system-deps)"
    with cluster_with_env(tmp_path, {}) as info:
        job_id = submit(info, job_file(tmp_path, steps=400))
        wait_job_step(info, job_id, 3)
        chaos(info, "slow", "--job", job_id, "--rank", "2", "--factor", "2")
        agents = sorted(n.address for n in nodes(info).values())
        config = scrape_config(controller_metrics_address(info), agents)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        with open(tmp_path / "prometheus.log", "w") as log:
            server = subprocess.Popen(
                [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            targets = 1 + len(agents)
            _wait_for("every target up", lambda: len(_api(base, "/api/v1/query", query="up == 1")["data"]["result"])
                      == targets, timeout_s=30)

            def evaluated():
                groups = _api(base, "/api/v1/rules")["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

            rules = _wait_for("every rule evaluated", evaluated, timeout_s=30)
            assert {rule["name"] for rule in rules} == {rule["alert"] for rule in _alert_rules()}
            broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
            assert broken == {}

            def series(query: str):
                return _api(base, "/api/v1/query", query=query)["data"]["result"]

            # the live exporters: leader, nodes by condition, the job's progress, per-rank timings,
            # and the straggler score of the slowed rank (per rank, from the health loop)
            assert series("tenax_controller_is_leader == 1")
            assert sum(float(r["value"][1]) for r in series("tenax_nodes_by_condition")) == len(agents)
            assert series(f'tenax_job_step{{job="{job_id}"}} > 0')
            _wait_for("per-rank compute times from both agents", lambda: len(series(
                f'tenax_rank_compute_seconds{{job="{job_id}"}}')) == 4, timeout_s=20)
            _wait_for("a straggler score for every rank", lambda: len(series(
                f'tenax_straggler_score{{job="{job_id}"}}')) == 4, timeout_s=40)
            assert series("tenax_agent_slots")
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
