"""Generate the Grafana dashboards in ops/grafana/*.json.

    python ops/gen_dashboards.py          # rewrite the JSON files
    python ops/gen_dashboards.py --check  # exit 1 if a JSON file is stale

The JSON files are what Grafana (and the Helm chart's ConfigMaps) load; this
script is where they are edited, so the three dashboards share one layout
and one datasource convention. tests/ops/test_ops.py checks that the committed
JSON matches, that every query parses (promtool) and that every metric it
uses is exported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "grafana"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24
"""Grafana's grid is 24 columns wide."""


@dataclass
class Layout:
    """Places panels left to right, wrapping at the grid width; rows start a new line."""

    x: int = 0
    y: int = 0
    line_height: int = 0
    next_id: int = 1
    panels: list[dict[str, Any]] = field(default_factory=list)

    def row(self, title: str) -> None:
        self._new_line()
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > GRID_WIDTH:
            self._new_line()
        panel = {"id": self._id(), **panel, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)

    def _new_line(self) -> None:
        self.y += self.line_height
        self.x, self.line_height = 0, 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, **extra}


def targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    """(expr, legend) pairs -> targets A, B, C..."""
    return [target(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def timeseries(title: str, description: str, queries: list[dict[str, Any]], unit: str = "short",
               bars: bool = False, stack: bool = False, min_zero: bool = True) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "bars" if bars else "line", "lineWidth": 1,
                              "fillOpacity": 60 if bars else 10, "showPoints": "never", "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min_zero:
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
            "targets": queries, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, description: str, expr: str, unit: str = "short", legend: str = "",
         thresholds: list[tuple[float | None, str]] | None = None, text_mode: str = "value") -> dict[str, Any]:
    steps = [{"value": value, "color": color} for value, color in (thresholds or [(None, "blue")])]
    return {"type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
            "targets": [target(expr, legend, instant=True, range=False)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                        "textMode": text_mode, "orientation": "auto"}}


def bargauge(title: str, description: str, expr: str, legend: str, unit: str) -> dict[str, Any]:
    return {"type": "bargauge", "title": title, "description": description, "datasource": DATASOURCE,
            "targets": [target(expr, legend, instant=True, range=False)],
            "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}}


def state_timeline(title: str, description: str, expr: str, legend: str,
                   states: list[tuple[int, str, str]]) -> dict[str, Any]:
    mappings = [{"type": "value", "options": {str(value): {"text": text, "color": color, "index": i}}}
                for i, (value, text, color) in enumerate(states)]
    return {"type": "state-timeline", "title": title, "description": description, "datasource": DATASOURCE,
            "targets": [target(expr, legend)],
            "fieldConfig": {"defaults": {"mappings": mappings, "color": {"mode": "thresholds"}}, "overrides": []},
            "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}}


def rank_heatmap(title: str, description: str, expr: str) -> dict[str, Any]:
    """One heatmap row per rank (the series name), colored by value: no bucketing."""
    return {"type": "heatmap", "title": title, "description": description, "datasource": DATASOURCE,
            "targets": [target(expr, "{{rank}}", format="time_series")],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "rowsFrame": {"layout": "auto"},
                        "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "linear",
                                  "exponent": 0.5, "steps": 64, "reverse": False, "min": 0, "max": 10},
                        "yAxis": {"axisPlacement": "left", "axisLabel": "rank"},
                        "legend": {"show": True}, "tooltip": {"mode": "single", "yHistogram": False},
                        "cellValues": {"decimals": 1}}}


def datasource_variable() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
            "multi": False}


def query_variable(name: str, label: str, query: str, multi: bool = False) -> dict[str, Any]:
    variable = {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
                "definition": query, "query": {"query": query, "refId": f"{name}-variable"},
                "refresh": 2, "sort": 1, "current": {}, "hide": 0, "options": [], "regex": "",
                "includeAll": multi, "multi": multi}
    if multi:
        variable["allValue"] = ".*"
    return variable


def dashboard(uid: str, title: str, description: str, layout: Layout,
              variables: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["tenax"],
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "timezone": "browser", "time": {"from": "now-3h", "to": "now"}, "refresh": "30s",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "Tenax dashboards", "type": "dashboards", "tags": ["tenax"], "asDropdown": True}],
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": layout.panels,
    }


# ------------------------------------------------------------------ cluster
def cluster_overview() -> dict[str, Any]:
    lay = Layout()
    # Cluster gauges may be exported by every controller replica: max() de-duplicates.
    lay.row("Control plane")
    lay.add(stat("Leader replicas", "Controller replicas that hold the leader lease; exactly 1 is healthy.",
                 "sum(tenax_controller_is_leader)",
                 thresholds=[(None, "red"), (1, "green"), (2, "red")]), 4, 4)
    lay.add(stat("Jobs running", "", 'max(tenax_jobs{phase="RUNNING"})'), 4, 4)
    lay.add(stat("Jobs recovering", "", 'max(tenax_jobs{phase="RECOVERING"})',
                 thresholds=[(None, "green"), (1, "orange")]), 4, 4)
    lay.add(stat("Nodes ready", "", 'max(tenax_nodes{state="READY"})'), 4, 4)
    lay.add(stat("Nodes not ready", "Nodes whose etcd lease expired.", 'max(tenax_nodes{state="NOT_READY"})',
                 thresholds=[(None, "green"), (1, "red")]), 4, 4)
    lay.add(stat("Nodes degraded or failed", "", 'sum(max by (condition) '
                 '(tenax_nodes_by_condition{condition!="HEALTHY"}))',
                 thresholds=[(None, "green"), (1, "orange")]), 4, 4)

    lay.row("Jobs and nodes")
    lay.add(timeseries("Jobs by phase", "", targets(("max by (phase) (tenax_jobs)", "{{phase}}")),
                       stack=True), 8, 8)
    lay.add(timeseries("Nodes by state", "READY, NOT_READY (lease lost), CORDONED.",
                       targets(("max by (state) (tenax_nodes)", "{{state}}")), stack=True), 8, 8)
    lay.add(timeseries("Nodes by condition", "Health from the agents' NVML polling.",
                       targets(("max by (condition) (tenax_nodes_by_condition)", "{{condition}}")),
                       stack=True), 8, 8)
    lay.add(timeseries("Agents and slots", "Agents exporting metrics, and their worker slots.",
                       targets(("count(tenax_agent_info)", "agents"), ("sum(tenax_agent_slots)", "slots"))), 8, 8)
    lay.add(timeseries("Workers by state", "Worker processes on all agents.",
                       targets(("sum by (state) (tenax_agent_workers)", "{{state}}")), stack=True), 8, 8)
    lay.add(timeseries("Worker exits by reason", "ok, error, signal, killed.",
                       targets(("sum by (reason) (increase(tenax_agent_worker_exits_total[$__rate_interval]))",
                                "{{reason}}")), bars=True), 8, 8)

    lay.row("Recoveries")
    lay.add(timeseries("Recoveries by cause", "",
                       targets(("sum by (cause) (increase(tenax_recoveries_total[$__rate_interval]))", "{{cause}}")),
                       bars=True), 8, 8)
    lay.add(timeseries("MTTR (total recovery time), last hour",
                       "Quantiles of the total recovery time over a sliding hour; the goal is a few seconds.",
                       targets(*[(f"histogram_quantile({q}, sum by (le) "
                                  f'(rate(tenax_recovery_duration_seconds_bucket{{phase="total"}}[1h])))', f"p{p}")
                                 for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))]), unit="s"), 8, 8)
    lay.add(timeseries("Recovery time by phase (p90, last hour)",
                       "detection, plan, rebuild (communicators), transfer (state), total.",
                       targets(("histogram_quantile(0.9, sum by (le, phase) "
                                "(rate(tenax_recovery_duration_seconds_bucket[1h])))", "{{phase}}")),
                       unit="s"), 8, 8)
    lay.add(bargauge("Last MTTR by job", "Total time of each running job's last recovery.",
                     "max by (job) (tenax_recovery_mttr_seconds)", "{{job}}", "s"), 8, 8)
    lay.add(stat("Steps lost (time range)", "Completed steps lost to recoveries; the goal is 0.",
                 "sum(increase(tenax_steps_lost_total[$__range]))",
                 thresholds=[(None, "green"), (1, "orange")]), 4, 4)
    lay.add(stat("Hangs detected (time range)", "", "sum(increase(tenax_hangs_detected_total[$__range]))"), 4, 4)
    lay.add(stat("Stragglers flagged (time range)", "",
                 "sum(increase(tenax_stragglers_flagged_total[$__range]))"), 4, 4)
    lay.add(stat("Agent lease losses (time range)", "Agents that lost and re-created their etcd lease.",
                 "sum(increase(tenax_agent_lease_lost_total[$__range]))"), 4, 4)
    lay.add(timeseries("Controller gRPC requests", "By status code; non-OK codes point at bad input or outages.",
                       targets(("sum by (code) (rate(tenax_grpc_requests_total[$__rate_interval]))", "{{code}}")),
                       unit="reqps"), 16, 8)
    return dashboard("tenax-cluster-overview", "Tenax / Cluster overview",
                     "Jobs, nodes and recoveries across the Tenax cluster.", lay, [])


# ---------------------------------------------------------------------- job
def job_detail() -> dict[str, Any]:
    lay = Layout()
    job = 'job="$job"'
    lay.row("Progress")
    lay.add(stat("Phase", "", f"max by (phase) (tenax_job_phase{{{job}}}) == 1", legend="{{phase}}",
                 text_mode="name"), 4, 4)
    lay.add(stat("Step", "", f"max(tenax_job_step{{{job}}})"), 4, 4)
    lay.add(stat("Loss", "", f"max(tenax_job_loss{{{job}}})"), 4, 4)
    lay.add(stat("Throughput", "", f"max(tenax_job_tokens_per_second{{{job}}})", unit="tokens/s"), 4, 4)
    lay.add(stat("Plan generation", "Every change of workers, layout or shares is a new generation.",
                 f"max(tenax_job_generation{{{job}}})"), 4, 4)
    lay.add(stat("Workers", "", f"max(tenax_job_workers{{{job}}})"), 4, 4)
    lay.add(timeseries("Loss", "Loss at the last reported step.",
                       targets((f"max(tenax_job_loss{{{job}}})", "loss")), min_zero=False), 12, 8)
    lay.add(timeseries("Throughput", "Tokens per second, and steps per second.",
                       targets((f"max(tenax_job_tokens_per_second{{{job}}})", "tokens/s"),
                               (f"deriv(tenax_job_step{{{job}}}[$__rate_interval])", "steps/s"))), 12, 8)
    lay.add(timeseries("Plan generation and workers", "A step in the generation marks a recovery or a rebalance.",
                       targets((f"max(tenax_job_generation{{{job}}})", "generation"),
                               (f"max(tenax_job_workers{{{job}}})", "workers"))), 12, 8)
    lay.add(timeseries("Seconds since last step", "Progress heartbeat; the job-stalled alert fires at 10 minutes.",
                       targets((f"time() - max(tenax_job_last_progress_timestamp_seconds{{{job}}})", "age")),
                       unit="s"), 12, 8)

    lay.row("Recoveries")
    lay.add(timeseries("Recoveries by cause", "",
                       targets((f"sum by (cause) (increase(tenax_job_recoveries_total{{{job}}}"
                                f"[$__rate_interval]))", "{{cause}}")), bars=True), 8, 8)
    lay.add(bargauge("Last recovery by phase", "detection, plan, rebuild, transfer, total (MTTR).",
                     f"max by (phase) (tenax_job_last_recovery_seconds{{{job}}})", "{{phase}}", "s"), 8, 8)
    lay.add(stat("Last MTTR", "", f"max(tenax_recovery_mttr_seconds{{{job}}})", unit="s",
                 thresholds=[(None, "green"), (10, "orange"), (30, "red")]), 4, 4)
    lay.add(stat("Steps lost", "Completed steps lost to recoveries since the job started; the goal is 0.",
                 f"max(tenax_steps_lost_total{{{job}}})", thresholds=[(None, "green"), (1, "orange")]), 4, 4)
    lay.add(stat("Hangs detected", "", f"max(tenax_hangs_detected_total{{{job}}})"), 4, 4)
    lay.add(stat("Stragglers flagged", "", f"max(tenax_stragglers_flagged_total{{{job}}})"), 4, 4)
    lay.add(timeseries("Recovery time by phase, all jobs (p90, last hour)",
                       "The duration histogram is cluster-wide; see 'Last recovery by phase' for this job.",
                       targets(("histogram_quantile(0.9, sum by (le, phase) "
                                "(rate(tenax_recovery_duration_seconds_bucket[1h])))", "{{phase}}")),
                       unit="s"), 24, 8)

    lay.row("Goodput")
    lay.add(stat("Goodput (ETTR)", "Productive step time / wall time since submit; the rest is split below.",
                 f"max(tenax_job_goodput_ratio{{{job}}})", unit="percentunit",
                 thresholds=[(None, "red"), (0.8, "orange"), (0.95, "green")]), 6, 8)
    lay.add(timeseries("Time lost by cause", "Wall time since submit that was not productive training: pending "
                       "(queue, start-up), recovery (MTTR), replayed steps, stalls (hangs before detection, "
                       "planned switches, overhead between steps).",
                       targets((f"max by (cause) (tenax_job_time_lost_seconds{{{job}}})", "{{cause}}")),
                       unit="s"), 18, 8)

    lay.row("Snapshots")
    lay.add(timeseries("Recoverable-step lag", "Steps a failure would lose now (current step minus the newest "
                       "snapshot that verifies on a surviving buddy).",
                       targets((f"max(tenax_job_recoverable_step_lag{{{job}}})", "steps"))), 12, 8)
    lay.add(timeseries("Recoverable snapshot age", "Seconds since the newest recoverable snapshot completed.",
                       targets((f"max(tenax_job_recoverable_age_seconds{{{job}}})", "age")), unit="s"), 12, 8)

    lay.row("Ranks")
    lay.add(rank_heatmap("Straggler score by rank",
                         "Robust z-score of each rank's compute time against the median rank, in MAD units. "
                         "A rank that stays dark is a straggler.",
                         f"max by (rank) (tenax_straggler_score{{{job}}})"), 24, 9)
    lay.add(timeseries("Compute time by rank", "Forward + backward time of each rank's last step. Unlike step time, "
                       "this singles out the slow rank.",
                       targets((f"max by (rank) (tenax_rank_compute_seconds{{{job}}})", "rank {{rank}}")),
                       unit="s"), 12, 8)
    lay.add(timeseries("Collective time by rank", "Time in collectives; the ranks that wait for a straggler "
                       "spend the most here.",
                       targets((f"max by (rank) (tenax_rank_collective_seconds{{{job}}})", "rank {{rank}}")),
                       unit="s"), 12, 8)
    lay.add(timeseries("Communication vs compute by rank",
                       "Per rank: compute time next to the time waited in each kind of communication "
                       "(trainer/comm.py). A rank whose compute is normal but whose pipeline receives are slow "
                       "waits for a link or a peer, not for itself.",
                       [target(f"max by (rank) (tenax_rank_compute_seconds{{{job}}})", "rank {{rank}} compute", "A"),
                        target(f"max by (rank, kind) (tenax_rank_comm_seconds{{{job}}})",
                               "rank {{rank}} {{kind}}", "B")], unit="s"), 24, 8)
    lay.add(timeseries("Pipeline link waits",
                       "Per pipeline link (sender -> receiver): the receiver's median wait per step for the "
                       "sender's transfers over its recent steps (controller). A link far above the same stage "
                       "pair of the other replicas, with a sender that computes normally, is a slow link or "
                       "sending side: the straggler event names it.",
                       targets((f"max by (sender, receiver) (tenax_pipeline_link_wait_seconds{{{job}}})",
                                "{{sender}} -> {{receiver}}")), unit="s"), 18, 8)
    lay.add(stat("Slow links", "Pipeline links found slow while their sender computes normally (no plan "
                 "change: an event and this count).", f"max(tenax_slow_links_total{{{job}}})",
                 thresholds=[(None, "green"), (1, "orange")]), 6, 8)
    lay.add(timeseries("Step time by rank", "", targets(
        (f"max by (rank) (tenax_rank_step_seconds{{{job}}})", "rank {{rank}}")), unit="s"), 12, 8)
    lay.add(timeseries("Last step by rank", "A rank that stops advancing is hung (or blocked behind one).",
                       targets((f"max by (rank) (tenax_rank_step{{{job}}})", "rank {{rank}}"))), 12, 8)
    return dashboard("tenax-job-detail", "Tenax / Job detail",
                     "One training job: progress, recoveries, snapshots and per-rank timing.", lay,
                     [query_variable("job", "Job", "label_values(tenax_job_step, job)")])


# --------------------------------------------------------------------- node
def node_health() -> dict[str, Any]:
    lay = Layout()
    node = 'instance=~"$instance"'
    gpu_legend = "{{instance}} gpu {{gpu}}"
    lay.row("Nodes")
    # One value per node: 0 healthy, 1 degraded, 2 failed (the worst condition set to 1).
    condition = (f'max by (instance) ((tenax_node_condition{{{node}, condition="HEALTHY"}} == 1) * 0 '
                 f'or (tenax_node_condition{{{node}, condition="DEGRADED"}} == 1) * 1 '
                 f'or (tenax_node_condition{{{node}, condition=~"FAILED.*"}} == 1) * 2)')
    lay.add(state_timeline("Node condition", "From the agent's NVML polling (XID, ECC, throttling).", condition,
                           "{{instance}}", [(0, "HEALTHY", "green"), (1, "DEGRADED", "orange"),
                                            (2, "FAILED", "red")]), 24, 6)
    lay.add(timeseries("CPU", "Host CPU utilization.",
                       targets((f"tenax_node_cpu_percent{{{node}}} * on (instance) group_left (node) "
                                f"tenax_agent_info", "{{node}}")), unit="percent"), 8, 8)
    lay.add(timeseries("Memory", "Host memory in use.",
                       targets((f"tenax_node_memory_used_bytes{{{node}}} / "
                                f"tenax_node_memory_total_bytes{{{node}}}", "{{instance}}")),
                       unit="percentunit"), 8, 8)
    lay.add(timeseries("Workers by state", "", targets(
        (f"sum by (instance, state) (tenax_agent_workers{{{node}}})", "{{instance}} {{state}}"),
        (f"max by (instance) (tenax_agent_slots{{{node}}})", "{{instance}} slots"))), 8, 8)
    lay.add(timeseries("Worker exits by reason", "", targets(
        (f"sum by (instance, reason) (increase(tenax_agent_worker_exits_total{{{node}}}[$__rate_interval]))",
         "{{instance}} {{reason}}")), bars=True), 8, 8)
    lay.add(timeseries("Exit report latency", "Last worker exit to its report in etcd; the goal is < 100 ms.",
                       targets((f"tenax_agent_exit_report_seconds{{{node}}}", "{{instance}}")), unit="s"), 8, 8)
    lay.add(timeseries("Lease losses", "The agent lost its etcd lease and re-registered.", targets(
        (f"increase(tenax_agent_lease_lost_total{{{node}}}[$__rate_interval])", "{{instance}}")), bars=True), 8, 8)

    lay.row("GPUs")
    lay.add(timeseries("GPU utilization", "", targets((f"tenax_gpu_utilization_percent{{{node}}}", gpu_legend)),
                       unit="percent"), 8, 8)
    lay.add(timeseries("GPU memory used", "", targets((f"tenax_gpu_memory_used_bytes{{{node}}}", gpu_legend)),
                       unit="bytes"), 8, 8)
    lay.add(timeseries("GPU temperature", "", targets((f"tenax_gpu_temperature_celsius{{{node}}}", gpu_legend)),
                       unit="celsius"), 8, 8)
    lay.add(timeseries("GPU power", "", targets((f"tenax_gpu_power_watts{{{node}}}", gpu_legend)),
                       unit="watt"), 8, 8)
    lay.add(timeseries("GPU SM clock", "A clock far below its peak under load means throttling.",
                       targets((f"tenax_gpu_sm_clock_mhz{{{node}}}", gpu_legend)), unit="rotmhz"), 8, 8)
    lay.add(state_timeline("GPU throttled", "A thermal or power throttle reason is active.",
                           f"tenax_gpu_throttled{{{node}}}", gpu_legend,
                           [(0, "ok", "green"), (1, "throttled", "orange")]), 8, 8)
    lay.add(timeseries("XID errors", "XID events per interval. Some are application faults (13, 31, 43); "
                       "others (48, 63, 64, 74, 79, 92-95) mean bad hardware.",
                       targets((f"increase(tenax_gpu_xid_errors_total{{{node}}}[$__rate_interval])", gpu_legend)),
                       bars=True), 8, 8)
    lay.add(timeseries("ECC double-bit errors (volatile)", "Any value above 0: the GPU's memory cannot be trusted.",
                       targets((f"tenax_gpu_ecc_volatile_dbe{{{node}}}", gpu_legend))), 8, 8)
    lay.add(state_timeline("GPU health", "The agent's verdict per GPU.", f"tenax_gpu_healthy{{{node}}}", gpu_legend,
                           [(1, "healthy", "green"), (0, "unhealthy", "red")]), 8, 8)
    return dashboard("tenax-node-health", "Tenax / Node and GPU health",
                     "Host and GPU telemetry from the Tenax agents (one scrape target per node).", lay,
                     [query_variable("instance", "Node", "label_values(tenax_agent_info, instance)", multi=True)])


DASHBOARDS = {
    "cluster-overview.json": cluster_overview,
    "job-detail.json": job_detail,
    "node-health.json": node_health,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed dashboard is stale")
    args = parser.parse_args(argv)
    stale = []
    for filename, build in DASHBOARDS.items():
        path = HERE / filename
        wanted = render(build)
        if path.exists() and path.read_text() == wanted:
            continue
        stale.append(filename)
        if not args.check:
            path.write_text(wanted)
            print(f"wrote {path}")
    if args.check and stale:
        print(f"stale dashboards: {', '.join(stale)}; run python ops/gen_dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
