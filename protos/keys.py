"""The etcd key layout: the one place that spells a Tenax key.

Every value is UTF-8 JSON (human-readable with ``etcdctl get``). A reader that
finds a malformed value logs it and skips it; it never crashes.

Layout (``P`` is the cluster prefix, default ``/tenax``)::

    P/leader                              controller leader record, under the leader's lease
    P/_rev                                scratch key (empty): a put+delete tells a reader the store's revision
    P/nodes/<node>                        NodeInfo, under the agent's lease (gone => NOT_READY)
    P/nodes/<node>/health                 latest NodeHealth (telemetry), under the agent's lease
    P/cordons/<node>                      present => node is cordoned (survives agent restarts)
    P/registry/<node>                     the controller's persistent record of a node (lost nodes show NOT_READY)
    P/jobs/<job>/spec                     JobSpec (written once, at submit)
    P/jobs/<job>/status                   JobStatus (phase, step, loss, workers, recoveries ...)
    P/jobs/<job>/plan                     the current Plan (generation g); g+1 is written in a txn guarded by g
    P/jobs/<job>/cancel                   present => the job was cancelled
    P/jobs/<job>/growth                   GrowthRecord: a two-phase growth of the job (prepare, then switch)
    P/jobs/<job>/joiners/<node>/<slot>    JoinerRecord: a worker started for a growth is READY (the worker),
                                          or exited before the switch (its agent)
    P/jobs/<job>/workers/<rank>           WorkerStatus reported by the agent (pid, state, exit)
    P/jobs/<job>/progress/<rank>          latest progress summary of a rank (throttled by the agent)
    P/jobs/<job>/metrics/<step:012d>      a batch of per-step records starting at <step> (rank 0)
    P/jobs/<job>/events/<seq:012d>        job events keyed by generation (plan, recovery, straggler)
    P/jobs/<job>/events/t<time_ns:020d>-<id>  every other job event (common/events.py); readers sort by time
    P/jobs/<job>/telemetry/<node>         per-step rank timings and liveness of the node's ranks (agent, ~1/s)
    P/chaos/<node>/<id>                   a chaos (fault injection) or kill request for that node's agent
    P/owners/<job>                        the identity that submitted the job (written with its spec)
    P/auth/tokens/<token_id>              an API token: name, role, salt, hash, expiry (never the token itself)
    P/auth/quota/<identity>               the job id of the identity's latest submit: every submit rewrites it in
                                          the txn that creates the job, so two racing submits cannot both pass
                                          the active-jobs limit
    P/requests/<identity>/<request_id>    the job a SubmitJob request id created (a retry returns that job)
    P/audit/<time_ns:020d>-<rand>         one audit record per mutating call (bounded retention)
    P/audit-refused/<time_ns:020d>-<rand> refused calls without valid credentials, counted per source, method
                                          and result over a window (own retention: a flood of them never
                                          evicts the records of authenticated callers)
"""

from __future__ import annotations

DEFAULT_PREFIX = "/tenax"


class Keys:
    """Builds keys under one cluster prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"etcd prefix must start with '/' and not end with it, got {prefix!r}")
        self.prefix = prefix

    # cluster ------------------------------------------------------------
    def leader(self) -> str:
        return f"{self.prefix}/leader"

    def revision_probe(self) -> str:
        return f"{self.prefix}/_rev"

    def nodes(self) -> str:
        return f"{self.prefix}/nodes/"

    def node(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def node_health(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}/health"

    def cordons(self) -> str:
        return f"{self.prefix}/cordons/"

    def cordon(self, node: str) -> str:
        return f"{self.prefix}/cordons/{node}"

    def registry(self) -> str:
        return f"{self.prefix}/registry/"

    def node_registry(self, node: str) -> str:
        return f"{self.prefix}/registry/{node}"

    # jobs ---------------------------------------------------------------
    def jobs(self) -> str:
        return f"{self.prefix}/jobs/"

    def job(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/"

    def job_spec(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/spec"

    def job_status(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/status"

    def job_plan(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/plan"

    def job_cancel(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/cancel"

    def job_growth(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/growth"

    def job_joiners(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/joiners/"

    def job_joiner(self, job: str, node: str, slot: int) -> str:
        return f"{self.prefix}/jobs/{job}/joiners/{node}/{slot}"

    def job_workers(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/workers/"

    def job_worker(self, job: str, rank: int) -> str:
        return f"{self.prefix}/jobs/{job}/workers/{rank}"

    def job_progress(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/progress/"

    def job_progress_rank(self, job: str, rank: int) -> str:
        return f"{self.prefix}/jobs/{job}/progress/{rank}"

    def job_metrics(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/metrics/"

    def job_metrics_batch(self, job: str, first_step: int) -> str:
        return f"{self.prefix}/jobs/{job}/metrics/{first_step:012d}"

    def job_metrics_backfill(self, job: str, first_step: int, generation: int) -> str:
        """A survivor's re-sent step records for ``generation`` (a key of their own: they never
        overwrite the metrics rank's batch that starts at the same step)."""
        return f"{self.prefix}/jobs/{job}/metrics/{first_step:012d}-backfill-g{generation}"

    def job_events(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/events/"

    def job_event(self, job: str, seq: int) -> str:
        return f"{self.prefix}/jobs/{job}/events/{seq:012d}"

    def job_event_at(self, job: str, time_ns: int, suffix: str) -> str:
        """An event keyed by its time (``suffix`` keeps two writers apart, or makes a rewrite idempotent)."""
        return f"{self.prefix}/jobs/{job}/events/t{time_ns:020d}-{suffix}"

    def job_telemetry(self, job: str) -> str:
        return f"{self.prefix}/jobs/{job}/telemetry/"

    def job_telemetry_node(self, job: str, node: str) -> str:
        return f"{self.prefix}/jobs/{job}/telemetry/{node}"

    def job_flights(self, job: str) -> str:
        """Flight Recorder dumps taken on hang decisions (protos/flight.py)."""
        return f"{self.prefix}/jobs/{job}/flight/"

    def job_flight(self, job: str, generation: int, node: str) -> str:
        return f"{self.prefix}/jobs/{job}/flight/{generation:012d}/{node}"

    # chaos and kill requests (controller/chaos.py -> agent/chaos.py) -------
    def chaos(self, node: str) -> str:
        return f"{self.prefix}/chaos/{node}/"

    def chaos_request(self, node: str, request_id: str) -> str:
        return f"{self.prefix}/chaos/{node}/{request_id}"

    # security (controller/auth.py, controller/audit.py) -------------------
    def owners(self) -> str:
        return f"{self.prefix}/owners/"

    def job_owner(self, job: str) -> str:
        return f"{self.prefix}/owners/{job}"

    def tokens(self) -> str:
        return f"{self.prefix}/auth/tokens/"

    def token(self, token_id: str) -> str:
        return f"{self.prefix}/auth/tokens/{token_id}"

    def user_quota(self, identity: str) -> str:
        return f"{self.prefix}/auth/quota/{identity}"

    def submit_requests(self) -> str:
        return f"{self.prefix}/requests/"

    def submit_request(self, identity: str, request_id: str) -> str:
        return f"{self.prefix}/requests/{identity}/{request_id}"

    def audit(self) -> str:
        return f"{self.prefix}/audit/"

    def audit_record(self, time_ns: int, suffix: str) -> str:
        """Keys sort by time, so the oldest records come first in a range read."""
        return f"{self.prefix}/audit/{time_ns:020d}-{suffix}"

    def audit_refused(self) -> str:
        return f"{self.prefix}/audit-refused/"

    def audit_refused_record(self, time_ns: int, suffix: str) -> str:
        return f"{self.prefix}/audit-refused/{time_ns:020d}-{suffix}"

    # parsing --------------------------------------------------------------
    def parse_job_key(self, key: str) -> tuple[str, str] | None:
        """``P/jobs/<job>/<rest>`` -> (job, rest); None for anything else."""
        head = f"{self.prefix}/jobs/"
        if not key.startswith(head):
            return None
        job, sep, rest = key[len(head):].partition("/")
        if not job or not sep:
            return None
        return job, rest

    def parse_node_key(self, key: str) -> str | None:
        """``P/nodes/<node>`` -> node; None for sub-keys such as health."""
        head = self.nodes()
        if not key.startswith(head):
            return None
        node = key[len(head):]
        return node if node and "/" not in node else None
