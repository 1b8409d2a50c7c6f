"""A real Prometheus scrapes the real metric registries: the alert rules load and
evaluate, and every dashboard query returns data.

promtool only parses; this catches what shows up at evaluation time: a label
that is not there (the Tenax `job` label needs `honor_labels: true`), a join
that matches nothing or many-to-many, a selector that finds no series.
The metrics are served by a child process, so the test never touches the
registries of the process that runs the other tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ops.test_ops import ALERTS, _alert_rules, _dashboard_queries, substitute_grafana_variables

REPO = Path(__file__).resolve().parents[2]
JOB = "example-job"  # the value substitute_grafana_variables gives $job

# Sets one value on every metric of both catalogs (a cluster with one job of four
# ranks, one node with two GPUs), then serves the controller and agent registries
# on two ephemeral ports and prints them.
EXPORTER = f"""
import json, sys, time
from prometheus_client import start_http_server
from controller import metrics as c
from agent import metrics as a

job = {JOB!r}
c.CONTROLLER_IS_LEADER.set(1)
for phase, n in (("PENDING", 0), ("RUNNING", 1), ("RECOVERING", 0)):
    c.JOBS.labels(phase).set(n)
    c.JOB_PHASE.labels(job, phase).set(1 if phase == "RUNNING" else 0)
for state, n in (("READY", 1), ("NOT_READY", 1), ("CORDONED", 0)):
    c.NODES.labels(state).set(n)
for condition, n in (("HEALTHY", 1), ("DEGRADED", 0), ("FAILED", 0)):
    c.NODES_BY_CONDITION.labels(condition).set(n)
c.GRPC_REQUESTS.labels("/tenax.v1.Jobs/GetJob", "OK").inc(3)
c.JOB_STEP.labels(job).set(120)
c.JOB_LOSS.labels(job).set(2.5)
c.JOB_TOKENS_PER_SECOND.labels(job).set(5000)
c.JOB_GENERATION.labels(job).set(2)
c.JOB_WORKERS.labels(job).set(4)
c.JOB_LAST_PROGRESS.labels(job).set(time.time() - 3600)  # stalled for an hour
c.JOB_RECOVERABLE_STEP_LAG.labels(job).set(1)
c.JOB_RECOVERABLE_AGE.labels(job).set(2.0)
c.RECOVERIES.labels("worker-failed").inc()
c.JOB_RECOVERIES.labels(job, "worker-failed").inc()
for phase, seconds in (("detection", 0.05), ("plan", 0.02), ("rebuild", 0.8), ("transfer", 0.4), ("total", 1.3)):
    c.RECOVERY_DURATION.labels(phase).observe(seconds)
    c.JOB_LAST_RECOVERY.labels(job, phase).set(seconds)
c.RECOVERY_MTTR.labels(job).set(1.3)
c.JOB_GOODPUT.labels(job).set(0.9)
for cause, seconds in (("pending", 12.0), ("recovery", 1.3), ("replayed", 0.3), ("stall", 4.0)):
    c.JOB_TIME_LOST.labels(job, cause).set(seconds)
c.STEPS_LOST.labels(job).inc(0)
c.STRAGGLERS_FLAGGED.labels(job).inc(0)
c.HANGS_DETECTED.labels(job).inc(0)
c.SLOW_LINKS.labels(job).inc(1)
for sender, receiver in ((0, 1), (1, 0), (2, 3), (3, 2)):
    c.LINK_WAIT.labels(job, str(sender), str(receiver)).set(0.6 if (sender, receiver) == (0, 1) else 0.02)
for rank in range(4):
    c.STRAGGLER_SCORE.labels(job, str(rank)).set(9.0 if rank == 3 else 0.2)
    a.RANK_STEP.labels(job, str(rank)).set(120)
    a.RANK_STEP_SECONDS.labels(job, str(rank)).set(0.3)
    a.RANK_COMPUTE_SECONDS.labels(job, str(rank)).set(0.29 if rank == 3 else 0.2)
    a.RANK_COLLECTIVE_SECONDS.labels(job, str(rank)).set(0.01 if rank == 3 else 0.1)
    a.RANK_COMM_SECONDS.labels(job, str(rank), "gradient all-reduce").set(0.01 if rank == 3 else 0.1)

a.AGENT_INFO.labels("node-a").set(1)
a.AGENT_SLOTS.set(2)
a.AGENT_WORKERS.labels("running").set(2)
a.WORKER_EXITS.labels("killed").inc()
a.EXIT_REPORT_LATENCY.set(0.02)
a.EARLY_EXITS.inc()
a.LEASE_LOST.inc(0)
for condition in ("HEALTHY", "DEGRADED", "FAILED"):
    a.NODE_CONDITION.labels(condition).set(1 if condition == "HEALTHY" else 0)
a.NODE_CPU_PERCENT.set(12.5)
a.NODE_MEMORY_USED.set(8e9)
a.NODE_MEMORY_TOTAL.set(64e9)
for gpu in ("0", "1"):
    a.GPU_UTILIZATION.labels(gpu).set(90)
    a.GPU_MEMORY_USED.labels(gpu).set(4e10)
    a.GPU_TEMPERATURE.labels(gpu).set(70)
    a.GPU_POWER.labels(gpu).set(500)
    a.GPU_SM_CLOCK.labels(gpu).set(1900)
    a.GPU_THROTTLED.labels(gpu).set(0)
    a.GPU_XID_ERRORS.labels(gpu).inc(0)
    a.GPU_ECC_DBE.labels(gpu).set(2 if gpu == "1" else 0)  # GPU 1 has bad memory
    a.GPU_HEALTHY.labels(gpu).set(0 if gpu == "1" else 1)

controller, _ = start_http_server(0, addr="127.0.0.1", registry=c.REGISTRY)
agent, _ = start_http_server(0, addr="127.0.0.1", registry=a.REGISTRY)
print(json.dumps({{"controller": controller.server_port, "agent": agent.server_port}}), flush=True)
sys.stdin.read()  # serve until the test closes our stdin
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(what: str, check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """The base URL of a Prometheus scraping a controller and an agent exporter twice a second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's 'prometheus' package (make system-deps)")
    tmp = tmp_path_factory.mktemp("prometheus")
    exporter = subprocess.Popen([sys.executable, "-c", EXPORTER], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    server = None
    try:
        ports = json.loads(exporter.stdout.readline())
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": name, "honor_labels": True,
                 "static_configs": [{"targets": [f"127.0.0.1:{ports[name]}"]}]}
                for name in ("controller", "agent")
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        log = open(tmp / "prometheus.log", "w")
        server = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        # Two scrapes: enough samples for rate() and increase().
        _wait_for("two scrapes of both targets", lambda: all(
            float(r["value"][1]) >= 2
            for r in _api(base, "/api/v1/query", query="count_over_time(up[1m])")["data"]["result"]
        ) and len(_api(base, "/api/v1/query", query="up == 1")["data"]["result"]) == 2)
        yield base
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        exporter.stdin.close()
        try:
            exporter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            exporter.kill()


def test_alert_rules_load_and_evaluate_without_errors(prometheus):
    def evaluated():
        groups = _api(prometheus, "/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = _wait_for("every rule evaluated once", evaluated)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in _alert_rules()}
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert broken == {}


def test_alerts_fire_on_scraped_data(prometheus):
    def active():
        alerts = _api(prometheus, "/api/v1/alerts")["data"]["alerts"]
        names = {a["labels"]["alertname"] for a in alerts}
        wanted = {"TenaxGPUEccErrors", "TenaxNodeNotReady", "TenaxJobStalled"}
        return alerts if wanted <= names else None

    alerts = _wait_for("the ECC, node and stalled-job alerts", active)
    by_name = {a["labels"]["alertname"]: a for a in alerts}
    ecc = by_name["TenaxGPUEccErrors"]
    assert ecc["state"] == "firing" and ecc["labels"]["gpu"] == "1"  # no `for`: fires at once
    assert by_name["TenaxNodeNotReady"]["state"] == "pending"  # `for: 1m`
    stalled = by_name["TenaxJobStalled"]
    assert stalled["labels"]["job"] == JOB  # the Tenax job label survived the scrape
    # A healthy leader and fresh snapshots raise nothing.
    assert "TenaxControllerNoLeader" not in by_name
    assert "TenaxSnapshotsNotRecoverable" not in by_name


def test_every_dashboard_query_returns_data(prometheus):
    empty, errors = [], []
    for where, expr in _dashboard_queries():
        query = substitute_grafana_variables(expr)
        try:
            result = _api(prometheus, "/api/v1/query", query=query)
        except urllib.error.HTTPError as exc:
            errors.append(f"{where}: {query}: {exc.read().decode()}")
            continue
        if not result["data"]["result"]:
            empty.append(f"{where}: {query}")
    assert errors == []
    assert empty == [], "queries that found no series although every metric has a value"
