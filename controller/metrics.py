"""Controller metrics (Prometheus). Names are prefixed ``tenax_``; label sets
are bounded: ``job`` (series removed when a job ends), ``rank`` (< world size),
``phase``/``state``/``condition``/``cause`` (small enums), ``sender``/``receiver`` (the
pipeline edges of a job: at most 2 x world size).

This module is the catalog: ops/ dashboards and alert rules may use only the
names defined here or in agent/metrics.py (a test checks it).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# cluster
CONTROLLER_IS_LEADER = Gauge("tenax_controller_is_leader", "1 if this replica leads, else 0", registry=REGISTRY)
JOBS = Gauge("tenax_jobs", "Jobs by phase", ["phase"], registry=REGISTRY)
NODES = Gauge("tenax_nodes", "Nodes by state (READY, NOT_READY, CORDONED)", ["state"], registry=REGISTRY)
NODES_BY_CONDITION = Gauge("tenax_nodes_by_condition", "Nodes by health condition (HEALTHY, DEGRADED, FAILED)",
                           ["condition"], registry=REGISTRY)
GRPC_REQUESTS = Counter("tenax_grpc_requests_total", "gRPC requests by method and status code",
                        ["method", "code"], registry=REGISTRY)

# per job
JOB_STEP = Gauge("tenax_job_step", "Last step reported by the job", ["job"], registry=REGISTRY)
JOB_LOSS = Gauge("tenax_job_loss", "Loss at the last reported step", ["job"], registry=REGISTRY)
JOB_TOKENS_PER_SECOND = Gauge("tenax_job_tokens_per_second", "Training throughput (tokens/s)", ["job"],
                              registry=REGISTRY)
JOB_GENERATION = Gauge("tenax_job_generation", "Current plan generation", ["job"], registry=REGISTRY)
JOB_WORKERS = Gauge("tenax_job_workers", "Workers in the current plan", ["job"], registry=REGISTRY)
JOB_LAST_PROGRESS = Gauge("tenax_job_last_progress_timestamp_seconds",
                          "Unix time of the job's last step (progress heartbeat)", ["job"], registry=REGISTRY)
JOB_RECOVERABLE_STEP_LAG = Gauge("tenax_job_recoverable_step_lag",
                                 "Steps between the current step and the latest recoverable snapshot",
                                 ["job"], registry=REGISTRY)
JOB_RECOVERABLE_AGE = Gauge("tenax_job_recoverable_age_seconds",
                            "Seconds since the latest recoverable snapshot was completed", ["job"],
                            registry=REGISTRY)

JOB_GOODPUT = Gauge("tenax_job_goodput_ratio",
                    "Effective training time ratio (ETTR): productive step time / wall time since submit",
                    ["job"], registry=REGISTRY)
JOB_TIME_LOST = Gauge("tenax_job_time_lost_seconds",
                      "Wall time since submit that was not productive training, by cause "
                      "(pending, recovery, replayed, stall)", ["job", "cause"], registry=REGISTRY)

# recoveries and stragglers
RECOVERIES = Counter("tenax_recoveries_total", "Recoveries by cause", ["cause"], registry=REGISTRY)
RECOVERY_DURATION = Histogram(
    "tenax_recovery_duration_seconds", "Recovery time by phase (detection, plan, rebuild, transfer, total)",
    ["phase"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=REGISTRY)
RECOVERY_MTTR = Gauge("tenax_recovery_mttr_seconds", "Total time of the job's last recovery", ["job"],
                      registry=REGISTRY)
AUTO_CORDONS = Counter("tenax_auto_cordons_total",
                       "Slots (for one job) and nodes cordoned because they kept failing", ["kind"],
                       registry=REGISTRY)
for _kind in ("node", "slot"):  # exported at 0 from the start: increase() then sees the first cordon
    AUTO_CORDONS.labels(_kind)
STEPS_LOST = Counter("tenax_steps_lost_total", "Completed steps lost to recoveries", ["job"], registry=REGISTRY)
STRAGGLER_SCORE = Gauge("tenax_straggler_score",
                        "Robust z-score of a rank's compute time against the job's median (MAD units)",
                        ["job", "rank"], registry=REGISTRY)
STRAGGLERS_FLAGGED = Counter("tenax_stragglers_flagged_total", "Ranks flagged as persistent stragglers",
                             ["job"], registry=REGISTRY)
LINK_WAIT = Gauge("tenax_pipeline_link_wait_seconds",
                  "Median seconds per step a pipeline stage waited for one peer's transfers over its recent steps "
                  "(receiver rank <- sender rank)", ["job", "sender", "receiver"], registry=REGISTRY)
SLOW_LINKS = Counter("tenax_slow_links_total",
                     "Pipeline links (sender -> receiver) found slow while the sender's compute is normal",
                     ["job"], registry=REGISTRY)
HANGS_DETECTED = Counter("tenax_hangs_detected_total", "Ranks declared hung (no progress)", ["job"],
                         registry=REGISTRY)

# per-job views for ops/ (the job dashboard and the job-stalled / snapshot alerts)
JOB_PHASE = Gauge("tenax_job_phase", "1 for the job's current phase (PENDING, RUNNING, RECOVERING, ...), else 0",
                  ["job", "phase"], registry=REGISTRY)
JOB_RECOVERIES = Counter("tenax_job_recoveries_total", "Recoveries of a job by cause", ["job", "cause"],
                         registry=REGISTRY)
JOB_LAST_RECOVERY = Gauge("tenax_job_last_recovery_seconds",
                          "The job's last recovery by phase (detection, plan, rebuild, transfer, total)",
                          ["job", "phase"], registry=REGISTRY)


def forget_job(job: str) -> None:
    """Drop a finished job's series so the label set stays bounded."""
    for metric in (JOB_STEP, JOB_LOSS, JOB_TOKENS_PER_SECOND, JOB_GENERATION, JOB_WORKERS, JOB_LAST_PROGRESS,
                   JOB_RECOVERABLE_STEP_LAG, JOB_RECOVERABLE_AGE, RECOVERY_MTTR, JOB_GOODPUT):
        try:
            metric.remove(job)
        except KeyError:
            pass
    for metric in (STRAGGLER_SCORE, JOB_PHASE, JOB_RECOVERIES, JOB_LAST_RECOVERY, JOB_TIME_LOST, LINK_WAIT):
        for labels in list(metric._metrics):  # (job, rank|phase|cause) pairs
            if labels[0] == job:
                metric.remove(*labels)
