"""CI checks for ops/: alert rules, their promtool unit tests, dashboards, the metric table.

promtool (Debian package ``prometheus``; ``make system-deps``) is required:
these tests fail, not skip, without it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
ALERTS = OPS / "prometheus" / "alerts.yaml"
ALERT_TESTS = OPS / "prometheus" / "alerts_test.yaml"
DASHBOARDS = sorted((OPS / "grafana").glob("*.json"))
SEVERITIES = {"critical", "warning", "info"}
STANDARD_METRICS = {"up"}
"""Series every Prometheus has, usable without being in the Tenax catalog."""

# Plausible values for Grafana's variables, so dashboard queries become plain PromQL.
GRAFANA_VARIABLES = {
    "job": "example-job",
    "instance": ".*",
    "datasource": "prometheus",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}


def _load(path: Path) -> ModuleType:
    """Import a script from ops/ (not a package) by path."""
    name = f"tenax_ops_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen_metrics_doc = _load(OPS / "gen_metrics_doc.py")
gen_dashboards = _load(OPS / "gen_dashboards.py")


def _promtool() -> str:
    """promtool's path; a missing promtool fails the calling test (CI must not skip these checks)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (make system-deps)")
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


# ------------------------------------------------------------ PromQL names
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "atan2", "inf", "nan", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects.

    Strings, label matchers, range durations and label lists of by/on/... are
    removed first; what is left of each identifier that is neither a keyword
    nor a function call is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group()
        rest = text[match.end():].lstrip()
        before = text[:match.start()]
        if rest.startswith("(") or name.lower() in _KEYWORDS or (before and before[-1].isdigit()):
            continue
        names.add(name)
    # Belt and braces: any tenax_ token anywhere (even one the lexer above misreads).
    names |= {m for m in re.findall(r"tenax_[a-z0-9_]+", _STRING.sub('""', expr))}
    return names


def substitute_grafana_variables(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


# ------------------------------------------------------------ the sources
def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows may hold collapsed panels


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: panel {panel['title']!r} {target['refId']}", target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
                match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
                assert match, f"{path.name}: variable {variable['name']}: unsupported query {query!r}"
                queries.append((f"{path.name}: variable {variable['name']}", match.group(1)))
    return queries


# ------------------------------------------------------------ alert rules
def test_alert_rules_pass_promtool_check():
    result = _run([_promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests():
    result = _run([_promtool(), "test", "rules", str(ALERT_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown not firing"
    assert (fires | quiet) - alerts == set(), "tests for alerts that do not exist"


def test_every_alert_has_severity_annotations_and_an_existing_runbook():
    rules = _alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        name = rule["alert"]
        assert name.startswith("Tenax"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        runbook = annotations["runbook_url"]
        assert runbook.startswith("ops/runbooks/") and runbook.endswith(".md"), name
        assert (REPO / runbook).is_file(), f"{name}: runbook {runbook} does not exist"


def test_required_alerts_exist():
    alerts = {rule["alert"] for rule in _alert_rules()}
    required = {"TenaxNodeNotReady", "TenaxJobStalled", "TenaxRecoverySlow", "TenaxStragglerPersistent",
                "TenaxGPUXidErrors", "TenaxGPUEccErrors", "TenaxGPUUnhealthy", "TenaxSnapshotsNotRecoverable",
                "TenaxControllerNoLeader"}
    assert required - alerts == set()


# ------------------------------------------------------------ dashboards
def test_dashboards_match_their_generator():
    assert gen_dashboards.main(["--check"]) == 0, "run: python ops/gen_dashboards.py"
    assert {p.name for p in DASHBOARDS} == set(gen_dashboards.DASHBOARDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_valid_grafana_model(path):
    board = json.loads(path.read_text())
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in _panels(board["panels"]):
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()


def test_job_dashboard_has_job_variable_and_rank_heatmap():
    board = json.loads((OPS / "grafana" / "job-detail.json").read_text())
    assert "job" in {v["name"] for v in board["templating"]["list"]}
    heatmaps = [p for p in _panels(board["panels"]) if p["type"] == "heatmap"]
    assert any("tenax_straggler_score" in t["expr"] and "rank" in t["expr"] for p in heatmaps for t in p["targets"])


def test_every_dashboard_query_parses(tmp_path):
    queries = _dashboard_queries()
    assert len(queries) > 40
    # promtool parses the PromQL of recording rules; one rule per query.
    rules = [{"record": f"tenax_ops_check:query_{i}", "expr": substitute_grafana_variables(expr)}
             for i, (_, expr) in enumerate(queries)]
    rule_file = tmp_path / "dashboard_queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    result = _run([_promtool(), "check", "rules", str(rule_file)])
    if result.returncode != 0:
        index = "\n".join(f"query_{i}: {where}: {expr}" for i, (where, expr) in enumerate(queries))
        pytest.fail(f"promtool rejected a dashboard query:\n{result.stdout}{result.stderr}\n{index}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_query_check_catches_a_bad_query(tmp_path):
    # The check above is only worth something if promtool really rejects bad PromQL.
    rule_file = tmp_path / "bad.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "tenax_ops_check:bad", "expr": "sum by (job (tenax_job_step)"}]}]}))
    result = _run([_promtool(), "check", "rules", str(rule_file)])
    assert result.returncode != 0


# ------------------------------------------------------------ metric names
def test_metric_name_extraction():
    assert metric_names('sum by (le, phase) (rate(tenax_recovery_duration_seconds_bucket{phase="total"}[1h]))') \
        == {"tenax_recovery_duration_seconds_bucket"}
    assert metric_names("(time() - tenax_job_last_progress_timestamp_seconds) > 600 and on (job) "
                        'tenax_job_phase{phase="RUNNING"} == 1 offset 5m') \
        == {"tenax_job_last_progress_timestamp_seconds", "tenax_job_phase"}
    assert metric_names("tenax_a * on (instance) group_left (node) tenax_b or vector(0)") == {"tenax_a", "tenax_b"}
    assert metric_names('node_cpu_seconds_total{mode="idle"} + up') == {"node_cpu_seconds_total", "up"}
    assert metric_names('count({__name__=~"x"}) + 2e3 + 1.5 + Inf') == set()


def test_catalog_knows_series_names_of_each_type():
    exported = gen_metrics_doc.exported_series_names()
    assert {"tenax_job_step", "tenax_recoveries_total", "tenax_recovery_duration_seconds_bucket",
            "tenax_recovery_duration_seconds_sum", "tenax_recovery_duration_seconds_count",
            "tenax_gpu_xid_errors_total", "tenax_straggler_score"} <= exported
    assert "tenax_recoveries" not in exported  # a counter is exposed with _total
    assert "tenax_job_step_total" not in exported


def test_every_metric_used_by_rules_and_dashboards_is_exported():
    exported = gen_metrics_doc.exported_series_names() | STANDARD_METRICS
    used: dict[str, set[str]] = {}
    for rule in _alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alerts.yaml: {rule['alert']}")
    for where, expr in _dashboard_queries():
        for name in metric_names(substitute_grafana_variables(expr)):
            used.setdefault(name, set()).add(where)
    assert len(used) > 30
    unknown = {name: sorted(places) for name, places in used.items() if name not in exported}
    assert unknown == {}, "metrics used but exported by neither controller/metrics.py nor agent/metrics.py"


# ------------------------------------------------------------ docs
def test_readme_metric_table_is_current():
    assert gen_metrics_doc.main(["--check"]) == 0, "run: python ops/gen_metrics_doc.py"


def test_readme_lists_every_metric():
    readme = (OPS / "README.md").read_text()
    for doc in gen_metrics_doc.catalog():
        assert f"`{doc.display_name}`" in readme, doc.display_name
