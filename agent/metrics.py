"""Agent metrics (Prometheus): one agent per node. Labels are bounded:
``gpu`` (index on this node), ``state`` and ``reason`` (small enums), ``job``.
The node itself is the scrape target (``instance``), plus a ``node`` label on
the info metric for joins.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

AGENT_INFO = Gauge("tenax_agent_info", "Constant 1 with the node id", ["node"], registry=REGISTRY)
AGENT_SLOTS = Gauge("tenax_agent_slots", "Worker slots on this node", registry=REGISTRY)
AGENT_WORKERS = Gauge("tenax_agent_workers", "Workers on this node by state", ["state"], registry=REGISTRY)
WORKER_EXITS = Counter("tenax_agent_worker_exits_total", "Worker exits by reason (ok, error, signal, killed)",
                       ["reason"], registry=REGISTRY)
EXIT_REPORT_LATENCY = Gauge("tenax_agent_exit_report_seconds",
                            "Time from the last worker exit to its report in etcd", registry=REGISTRY)
EARLY_EXITS = Counter("tenax_agent_worker_exits_seen_early_total",
                      "Worker exits reported when the process began exiting, before its teardown ended "
                      "(agent/lifeline.py)", registry=REGISTRY)
LEASE_LOST = Counter("tenax_agent_lease_lost_total", "Times the node lease was lost and re-registered",
                     registry=REGISTRY)
NODE_CONDITION = Gauge("tenax_node_condition", "1 for the node's current condition (HEALTHY, DEGRADED, FAILED)",
                       ["condition"], registry=REGISTRY)

# host telemetry (psutil)
NODE_CPU_PERCENT = Gauge("tenax_node_cpu_percent", "Host CPU utilization (percent)", registry=REGISTRY)
NODE_MEMORY_USED = Gauge("tenax_node_memory_used_bytes", "Host memory in use (bytes)", registry=REGISTRY)
NODE_MEMORY_TOTAL = Gauge("tenax_node_memory_total_bytes", "Host memory (bytes)", registry=REGISTRY)

# GPU telemetry (NVML); absent on hosts without GPUs
GPU_UTILIZATION = Gauge("tenax_gpu_utilization_percent", "GPU utilization (percent)", ["gpu"], registry=REGISTRY)
GPU_MEMORY_USED = Gauge("tenax_gpu_memory_used_bytes", "GPU memory in use (bytes)", ["gpu"], registry=REGISTRY)
GPU_TEMPERATURE = Gauge("tenax_gpu_temperature_celsius", "GPU temperature (Celsius)", ["gpu"], registry=REGISTRY)
GPU_POWER = Gauge("tenax_gpu_power_watts", "GPU power draw (watts)", ["gpu"], registry=REGISTRY)
GPU_SM_CLOCK = Gauge("tenax_gpu_sm_clock_mhz", "GPU SM clock (MHz)", ["gpu"], registry=REGISTRY)
GPU_THROTTLED = Gauge("tenax_gpu_throttled", "1 if a thermal or power throttle reason is active", ["gpu"],
                      registry=REGISTRY)
GPU_XID_ERRORS = Counter("tenax_gpu_xid_errors_total", "XID error events seen", ["gpu"], registry=REGISTRY)
GPU_ECC_DBE = Gauge("tenax_gpu_ecc_volatile_dbe", "Volatile double-bit ECC errors", ["gpu"], registry=REGISTRY)
GPU_HEALTHY = Gauge("tenax_gpu_healthy", "1 if the GPU is healthy, 0 if degraded or failed", ["gpu"],
                    registry=REGISTRY)

# worker telemetry relayed by the agent
RANK_STEP = Gauge("tenax_rank_step", "Last step reported by a local rank", ["job", "rank"], registry=REGISTRY)
RANK_STEP_SECONDS = Gauge("tenax_rank_step_seconds", "Last step time of a local rank", ["job", "rank"],
                          registry=REGISTRY)
RANK_COMPUTE_SECONDS = Gauge("tenax_rank_compute_seconds", "Forward+backward compute time of a local rank's "
                             "last step", ["job", "rank"], registry=REGISTRY)
RANK_COLLECTIVE_SECONDS = Gauge("tenax_rank_collective_seconds", "Time in collectives in a local rank's last step",
                                ["job", "rank"], registry=REGISTRY)
RANK_COMM_SECONDS = Gauge("tenax_rank_comm_seconds", "Wall time a local rank waited in each kind of communication "
                          "(gradient all-reduce, pipeline receive...) in its last step", ["job", "rank", "kind"],
                          registry=REGISTRY)
