"""The leader's health loop: hang, straggler and degraded-GPU detection, wired to actions.

Every ``interval_s`` the leader gathers what the agents published (the etcd
mirror: ``Keys.job_telemetry_node`` per job and node, written by
agent/rank_health.py; node conditions in NodeInfo, from agent/telemetry.py),
asks the pure decisions of controller/detection.py, and acts:

* hang      no progress for max(k x median step time, floor) -> a kill request for
            each culprit rank to its agent (controller/chaos.py, the same path as
            ``tenax chaos kill``); the worker's exit starts the recovery
            (controller/recovery.py). ``tenax_hangs_detected_total``.
* straggler per-step compute times of every rank -> robust z-scores
            (``tenax_straggler_score``), flagged ranks (``tenax_stragglers_flagged_total``
            and a ``straggler`` job event in etcd, see ``straggler_event``),
            and per the job's ``elastic.straggler_policy``: ``rebalance`` sample shares
            at a step boundary (``Recovery.request_rebalance``; the global batch is
            unchanged), ``evict`` a persistently slow rank to a spare at a step boundary
            (``Recovery.request_migration``), or ``alert`` only (log + metrics).
* link      the agents' per-rank ``comm`` summaries (medians of compute and of the waits per
            pipeline peer) -> controller/attribution.py: a receiver that waits on one sender
            while the sender computes normally names the link (or the sender's sending
            side), in the ``straggler`` event (``attribution``) and ``tenax_slow_links_total``;
            no plan change, and an eviction never moves a rank for a link.
* rendezvous a plan generation (g > 1) whose rendezvous some rank never reached within the
            deadline derived from this job's measured start-up and step times
            (controller/rendezvous.py) -> a ``rendezvous-timeout`` event per missing rank, then
            ``Recovery.request_replan`` without them (their slots quarantined as failures).
* degraded  a node whose agent reports DEGRADED or FAILED (XID, ECC, remapping,
            throttling...) and still runs workers -> drain it: cordon, and the
            recovery moves its workers at a step boundary (``Recovery.request_drain``).

The gathering functions are pure (``rank_progress``, ``step_window``,
``nodes_to_drain``): ``(state, now) -> decision``. The loop itself keeps only
what stops it from repeating an action (the ranks it already killed in a
generation, the generation it already rebalanced); a new leader may repeat one
action at most, which every action tolerates (a kill of a dead rank is a no-op,
a rebalance is guarded by the plan generation).

Settings (``HealthSettings``) come from ``tenax controller`` flags (cli/controller.py),
so that a local cluster (``tenax up --controller-arg``) and the tests can shorten the
timeouts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller import chaos, flight, metrics
from controller.attribution import Attribution, AttributionSettings, RankComm, attribute, window_from_summaries
from controller.detection import (
    HangDecision,
    HangSettings,
    RankProgress,
    StepTiming,
    StragglerAction,
    StragglerDecision,
    StragglerPolicy,
    StragglerSettings,
    decide_straggler,
    decision_window,
    detect_hang,
    per_sample_seconds,
)
from common import events
from common.layout import even_shares
from controller.events import hang_cause, hang_event, rendezvous_timeout_event, write_events
from controller.handle import ControllerHandle
from controller.recovery import Recovery
from controller.recovery_decisions import failed_slots
from controller.rendezvous import RendezvousSettings, RendezvousState, decide_rendezvous
from common.etcd import EtcdError, EtcdUnavailable
from controller.state import JobView, NodeSummary, jobs_from, nodes_from
from protos.plan import Plan
from protos.records import JobEventRecord

log = logging.getLogger("tenax.controller.health")

BAD_CONDITIONS = ("DEGRADED", "FAILED")

HANG_CHECKED_PHASES = ("RUNNING", "RECOVERING")
"""Job phases in which hung ranks are looked for. RECOVERING too: a rank that hangs (or was
SIGSTOPped) while the others re-plan never joins the new generation's rendezvous, and the
recovery would wait for it forever; its starting ranks get the startup timeout (stopped
ones the floor, ``hang_decision``)."""

COMM_SUMMARY_STEPS = 20
"""Steps an agent's per-rank ``comm`` summary spans at most (agent/rank_health.py ``COMM_STEPS``):
the attribution waits for min(straggler window, this) steps of every rank."""

STRAGGLER_EVENT_PART = 5
"""The straggler event of plan generation g sits at ``Keys.job_event(job, g * 10 + 5)``: job
events sort by generation, and controller/recovery.py writes parts 0 (plan) and 1 (recovery)."""


@dataclass(kw_only=True)
class HealthSettings:
    """The leader's health loop (``tenax controller --health-interval-s``, ``--hang-*``,
    ``--straggler-*``, ``--drain-degraded``)."""

    interval_s: float = 0.5
    """Seconds between two passes of the loop (> 0)."""
    hang: HangSettings = field(default_factory=HangSettings)
    """When a rank that makes no progress is declared hung (controller/detection.py)."""
    straggler: StragglerSettings = field(default_factory=StragglerSettings)
    """When a rank is flagged as a straggler, and when the loop acts on it (controller/detection.py)."""
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    """When a slow pipeline link (or a peer's sending side) is told apart from slow compute
    (controller/attribution.py)."""
    rendezvous: RendezvousSettings = field(default_factory=RendezvousSettings)
    """When a generation whose rendezvous some rank never reached is abandoned (controller/rendezvous.py)."""
    switch_ahead_steps: int = 5
    """A rebalance switches this many steps after the latest step seen (steps, >= 1): every
    rank must read the new plan before it reaches the boundary."""
    min_rebalance_gain: float = 0.1
    """A rebalance must make the predicted step this much faster (0.1 = 10%; in [0, 1)): per-sample
    speeds measured on a busy host easily differ by 5% between windows."""
    drain_degraded: bool = True
    """Drain nodes whose GPUs report DEGRADED or FAILED (False: metrics and logs only)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"interval_s: must be > 0 seconds, got {self.interval_s}")
        if not 0 <= self.min_rebalance_gain < 1:
            raise ValueError(f"min_rebalance_gain: must be in [0, 1), got {self.min_rebalance_gain}")
        if self.switch_ahead_steps < 1:
            raise ValueError(f"switch_ahead_steps: must be >= 1 steps, got {self.switch_ahead_steps}")


# ------------------------------------------------------------------ pure gathering
def telemetry_ranks(raw_values: Sequence[str]) -> dict[int, dict[str, Any]]:
    """rank -> its latest summary, from the job's telemetry values (one per node). Malformed
    values and entries are skipped; if two nodes report a rank (a move), the fresher wins."""
    ranks: dict[int, dict[str, Any]] = {}
    for raw in raw_values:
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        entries = data.get("ranks") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            continue
        for rank_text, entry in entries.items():
            if not (isinstance(rank_text, str) and rank_text.isdigit() and isinstance(entry, dict)):
                continue
            rank = int(rank_text)
            old = ranks.get(rank)
            if old is None or _number(entry.get("progress_at")) >= _number(old.get("progress_at")):
                ranks[rank] = entry
    return ranks


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def rank_progress(plan: Plan, ranks: Mapping[int, Mapping[str, Any]], *, generation_seen_at: float
                  ) -> list[RankProgress]:
    """Liveness of the plan's ranks that report telemetry for the plan's generation.

    Progress never predates ``generation_seen_at`` (when this loop first saw the
    generation): a recovery's rendezvous and state transfer are not a hang.
    """
    out = []
    for w in plan.workers:
        entry = ranks.get(w.rank)
        if entry is None or int(_number(entry.get("generation"))) != plan.generation:
            continue
        heartbeat = entry.get("heartbeat_at")
        out.append(RankProgress(
            rank=w.rank, step=int(_number(entry.get("step"))),
            progress_at=max(_number(entry.get("progress_at")), generation_seen_at),
            heartbeat_at=max(_number(heartbeat), generation_seen_at) if heartbeat is not None else None,
            in_collective=(entry.get("phase") == "collective") if entry.get("phase") else None,
            process_stopped=entry.get("stopped") if isinstance(entry.get("stopped"), bool) else None,
        ))
    return out


def step_window(plan: Plan, ranks: Mapping[int, Mapping[str, Any]]) -> list[StepTiming]:
    """The steps every rank of the plan reported at the plan's generation, oldest first.

    Compute times are scaled to an even share (``t x (global batch / dp) / share``):
    after a rebalance the ranks hold different shares on purpose, and a rank with
    more samples must not look slow for it. With even shares nothing changes.

    Collective time is split into moving and waiting across the ranks of one step:
    the fastest rank's collective time is (close to) pure data movement, so each
    rank's excess over it is time spent waiting for a slower peer.
    """
    even = sum(plan.sample_shares) / plan.dp
    per_step: dict[int, dict[int, tuple[float, float, float]]] = {}
    for w in plan.workers:
        entry = ranks.get(w.rank) or {}
        steps = entry.get("steps")
        for item in steps if isinstance(steps, list) else []:
            if not (isinstance(item, list) and len(item) >= 5):
                continue
            step, compute, collective, step_time, generation = item[:5]
            if int(_number(generation)) != plan.generation or _number(compute, -1.0) <= 0:
                continue
            scaled = float(compute) * even / plan.sample_shares[w.dp_rank]
            per_step.setdefault(int(_number(step)), {})[w.rank] = (scaled, _number(collective), _number(step_time))
    window = []
    for step in sorted(per_step):
        timings = per_step[step]
        if len(timings) != plan.world_size:
            continue  # a step some rank has not reported (yet)
        fastest = min(t[1] for t in timings.values())
        window.append(StepTiming(step=step, compute_s={r: t[0] for r, t in timings.items()},
                                 collective_wait_s={r: max(t[1] - fastest, 0.0) for r, t in timings.items()},
                                 step_time_s=max(t[2] for t in timings.values())))
    return window


def comm_window(plan: Plan, ranks: Mapping[int, Mapping[str, Any]], *, min_steps: int):
    """(rank -> RankComm, rank -> pipeline stage) from the agents' ``comm`` summaries of the plan's
    generation, each over at least ``min_steps`` steps; ({}, {}) until every rank of the plan has
    one (a partial window would compare a replica with nothing). Seconds are scaled to an even
    share, as in ``step_window``. Pure."""
    even = sum(plan.sample_shares) / plan.dp
    summaries, scale = {}, {}
    for w in plan.workers:
        comm = (ranks.get(w.rank) or {}).get("comm")
        if not (isinstance(comm, dict) and int(_number(comm.get("generation"))) == plan.generation
                and int(_number(comm.get("n"))) >= min_steps):
            return {}, {}
        summaries[w.rank] = comm
        scale[w.rank] = even / plan.sample_shares[w.dp_rank]
    window = window_from_summaries(summaries, scale=scale)
    if len(window) != plan.world_size:
        return {}, {}
    return window, {w.rank: w.pp_rank for w in plan.workers}


def link_waits(plan: Plan, ranks: Mapping[int, Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """(sender, receiver) -> the receiver's median wait seconds per step for the sender's pipeline
    transfers, from the ``comm`` summaries of the plan's generation: what
    ``tenax_pipeline_link_wait_seconds`` exports. Pure."""
    out: dict[tuple[str, str], float] = {}
    for w in plan.workers:
        comm = (ranks.get(w.rank) or {}).get("comm")
        if not (isinstance(comm, dict) and int(_number(comm.get("generation"))) == plan.generation):
            continue
        waits = window_from_summaries({w.rank: comm}).get(w.rank, RankComm(compute_s=0.0)).receive_wait_s
        out.update({(str(peer), str(w.rank)): seconds for peer, seconds in waits.items()})
    return out


def spare_link_ranks(decision: StragglerDecision, attribution: Attribution) -> tuple[StragglerDecision, str]:
    """An eviction never moves a rank whose slowness the attribution puts on a link and not on
    its compute (moving a healthy rank does not fix its peer's link): such ranks leave
    ``evict_ranks`` (an eviction left with none becomes an alert). Pure."""
    if decision.action is not StragglerAction.EVICT:
        return decision, ""
    on_links = {r for link in attribution.links for r in (link.sender, link.receiver)}
    spared = [r for r in decision.evict_ranks if r in on_links and r not in attribution.compute_ranks]
    if not spared:
        return decision, ""
    keep = tuple(r for r in decision.evict_ranks if r not in spared)
    note = f"not evicting ranks {spared}: their slowness is a link's, not their compute's"
    if keep:
        return dataclasses.replace(decision, evict_ranks=keep), note
    return dataclasses.replace(decision, action=StragglerAction.ALERT, evict_ranks=()), note


def with_attribution(data: Mapping[str, Any], attribution: Attribution, reason: str, *, step: int) -> dict[str, Any]:
    """``data`` (a straggler event) with the communication vs compute attribution decided at
    ``step``: the slow-compute ranks, links and peers it names, with their numbers, and the
    readable ``reason``. Pure."""
    return {**data, "attribution": {**attribution.to_dict(), "step": step, "reason": reason[:1000]}}


def stepped_in_generation(entry: Mapping[str, Any], generation: int) -> bool:
    """True once the rank completed a step of ``generation`` (its telemetry has one)."""
    steps = entry.get("steps")
    return any(isinstance(item, list) and len(item) >= 5 and int(_number(item[4])) == generation
               for item in (steps if isinstance(steps, list) else []))


def telemetry_since(*, synced: bool, synced_at: float, generation_seen_at: float) -> float | None:
    """The time from which the ranks' silence counts (hang, rendezvous deadline), or None
    while it cannot be judged. Pure.

    While the mirror is broken (etcd unreachable) it holds the telemetry of before the
    outage, and the agents cannot write newer: None. After it reloaded, silence counts from
    the later of the generation's first sighting and the reload: an etcd outage stops the
    progress timestamps the controller sees, not the ranks (they never wait for etcd), and
    the agents need a moment to write again."""
    if not synced:
        return None
    return max(generation_seen_at, synced_at)


def hang_decision(plan: Plan, ranks: Mapping[int, Mapping[str, Any]], now: float, *, generation_seen_at: float,
                  settings: HangSettings) -> tuple[HangDecision, str]:
    """Which ranks of the plan are hung now. Pure.

    A rank that has not finished a step of this generation yet (process start,
    rendezvous, state transfer, warm-up) is judged with the startup timeout,
    never with k x the median of the ranks that already stepped: the first step
    of a CPU worker alone can take longer than that. A starting rank whose
    process the kernel shows stopped (SIGSTOP) is not starting up: it is judged
    with the floor, or the rendezvous of the generation waits for it for the
    whole startup timeout (a survivor stopped while the others re-planned).
    """
    progress = rank_progress(plan, ranks, generation_seen_at=generation_seen_at)
    stepped = {r for r, e in ranks.items() if stepped_in_generation(e, plan.generation)}
    running = [p for p in progress if p.rank in stepped]
    starting = [p for p in progress if p.rank not in stepped and not p.process_stopped]
    stopped_starting = [p for p in progress if p.rank not in stepped and p.process_stopped]
    floor_only = dataclasses.replace(settings, startup_timeout_s=settings.floor_s)
    hung: list[int] = []
    stalled: list[int] = []
    reasons = []
    timeout = 0.0
    for group, times, judged in ((running, recent_step_times(ranks, plan.generation), settings),
                                 (starting, [], settings), (stopped_starting, [], floor_only)):
        if not group:
            continue
        decision, reason = detect_hang(group, times, now, judged)
        hung += decision.hung_ranks
        stalled += decision.stalled_ranks
        timeout = max(timeout, decision.timeout_s)
        reasons.append(reason)
    return HangDecision(hung_ranks=tuple(sorted(hung)), stalled_ranks=tuple(sorted(stalled)),
                        timeout_s=timeout), "; ".join(reasons) or "no rank reports telemetry"


MAX_STARTUP_SAMPLES = 32
"""Worker start-ups the loop remembers per job (the newest), beyond the ranks reporting now."""


def job_step_times(ranks: Mapping[int, Mapping[str, Any]]) -> list[float]:
    """Step wall times of every generation the ranks still report (the newest few dozen per rank)."""
    times = []
    for entry in ranks.values():
        for item in entry.get("steps") or []:
            if isinstance(item, list) and len(item) >= 5:
                times.append(_number(item[3]))
    return [t for t in times if t > 0]


def startup_samples(ranks: Mapping[int, Mapping[str, Any]]) -> dict[int, float]:
    """pid -> the start-up (spawn -> first rendezvous, seconds) each reporting worker measured."""
    out = {}
    for entry in ranks.values():
        startup = _number(entry.get("startup_s"), -1.0)
        if startup > 0:
            out[int(_number(entry.get("pid")))] = startup
    return out


def rendezvous_state(plan: Plan, ranks: Mapping[int, Mapping[str, Any]], *, seen_at: float,
                     startups: Sequence[float]) -> RendezvousState:
    """The plan generation's rendezvous as the telemetry shows it. Pure.

    A rank arrived once it reports a rendezvous of this generation (or a newer one) or a step
    of it (a lost arrival line must not abandon a generation that trains)."""
    arrived: dict[int, float] = {}
    for w in plan.workers:
        entry = ranks.get(w.rank)
        if entry is None:
            continue
        if int(_number(entry.get("arrived"))) >= plan.generation:
            arrived[w.rank] = _number(entry.get("arrived_at"), seen_at) or seen_at
        elif stepped_in_generation(entry, plan.generation):
            arrived[w.rank] = seen_at
    return RendezvousState(generation=plan.generation, ranks=tuple(w.rank for w in plan.workers),
                           arrived_at=arrived, seen_at=seen_at, startup_s=tuple(startups),
                           step_times_s=tuple(job_step_times(ranks)))


def predicted_step_factor(shares: Sequence[int], seconds_per_sample: Sequence[float]) -> float:
    """Relative step time of a share layout: the slowest replica, max(share x seconds per sample)."""
    return max(share * t for share, t in zip(shares, seconds_per_sample))


def worth_rebalancing(current: Sequence[int], proposed: Sequence[int], seconds_per_sample: Sequence[float],
                      min_gain: float) -> bool:
    """True if ``proposed`` shares make the step at least ``min_gain`` (0.05 = 5%) faster. Pure.

    The hysteresis keeps noisy per-sample speeds from flipping a job between two
    nearly equal layouts (each flip is a plan generation and a planned switch).
    """
    if tuple(proposed) == tuple(current):
        return False
    return (predicted_step_factor(proposed, seconds_per_sample)
            <= (1 - min_gain) * predicted_step_factor(current, seconds_per_sample))


def recent_step_times(ranks: Mapping[int, Mapping[str, Any]], generation: int) -> list[float]:
    """Step wall times of the generation (all ranks), for the hang timeout's median."""
    times = []
    for entry in ranks.values():
        for item in entry.get("steps") or []:
            if isinstance(item, list) and len(item) >= 5 and int(_number(item[4])) == generation:
                times.append(_number(item[3]))
    return [t for t in times if t > 0]


def nodes_to_drain(nodes: Mapping[str, NodeSummary]) -> list[tuple[str, str]]:
    """(node, reason) for every registered, uncordoned node in a bad condition that runs workers."""
    out = []
    for node in nodes.values():
        condition = str(node.record.get("condition", "HEALTHY"))
        if node.registered and node.cordon is None and condition in BAD_CONDITIONS and node.used_slots > 0:
            out.append((node.id, f"node {condition}: {node.record.get('condition_reason') or 'GPU health'}"))
    return out


def spare_exists(nodes: Mapping[str, NodeSummary], avoid: frozenset[tuple[str, int]] | set = frozenset()) -> bool:
    """A free slot on a ready, uncordoned, healthy node, other than the (node, slot)s in ``avoid``
    (slots the job evicted a straggler from, or where a worker of it failed)."""
    for n in nodes.values():
        if not (n.registered and n.cordon is None and str(n.record.get("condition", "HEALTHY")) == "HEALTHY"):
            continue
        slots = int(n.record.get("slots", 0) or 0)
        if n.used:
            free = [s for s in range(slots) if s not in n.used]
        else:  # only a count is known
            free = list(range(n.used_slots, slots))
        if any((n.id, s) not in avoid for s in free):
            return True
    return False


def policy_of(job: JobView) -> StragglerPolicy:
    try:
        return StragglerPolicy(job.spec.elastic.straggler_policy)
    except ValueError:
        return StragglerPolicy.ALERT


def latest_step_seen(plan: Plan, ranks: Mapping[int, Mapping[str, Any]]) -> int:
    """The highest step any rank of the plan reported at the plan's generation (0: none yet)."""
    steps = [int(_number(e.get("step"))) for r, e in ranks.items()
             if r < plan.world_size and int(_number(e.get("generation"))) == plan.generation]
    return max(steps, default=0)


def straggler_event(data: Mapping[str, Any], *, generation: int, policy: str, flagged: Mapping[int, float],
                    decided_at_step: int, seen_step: int, now: float) -> dict[str, Any]:
    """The data of a job's ``straggler`` event for one plan generation, with ``flagged``
    (rank -> its robust z-score) added to what ``data`` (the event so far, or {}) holds. Pure.

    Per rank, the first time it was flagged in this generation: ``step`` = the decision
    step (the newest step of the window the decision was made on: every rank had reported
    it), ``seen_step`` = the newest step any rank had reported (the controller's view of the
    job's progress), ``time`` (unix seconds), ``score``. Ranks already recorded keep their
    entry. ``action`` / ``action_step`` / ``action_reason`` are added by ``with_action``.
    """
    out = {"generation": generation, "policy": policy, "flagged": dict(data.get("flagged") or {}),
           **{k: v for k, v in data.items() if k not in ("generation", "policy", "flagged")}}
    for rank, score in flagged.items():
        out["flagged"].setdefault(str(rank), {"step": decided_at_step, "seen_step": max(seen_step, decided_at_step),
                                              "time": now, "score": round(float(score), 3)})
    return out


def with_action(data: Mapping[str, Any], *, action: str, decided_at_step: int, reason: str,
                ranks: Sequence[int] = ()) -> dict[str, Any]:
    """``data`` (a straggler event) with the plan the health loop asked for. Pure."""
    return {**data, "action": action, "action_step": decided_at_step, "action_ranks": sorted(ranks),
            "action_reason": reason[:500]}


# ------------------------------------------------------------------ the loop
@dataclass
class _JobMemory:
    generation: int = 0
    seen_at: float = 0.0
    killed: set[int] = field(default_factory=set)
    flagged: set[int] = field(default_factory=set)
    links: set[tuple[int, int]] = field(default_factory=set)
    """(sender, receiver) links already reported as slow in this generation."""
    acted: bool = False
    """A straggler action (rebalance/evict) was requested in this generation."""
    last_reason: str = ""
    event: dict[str, Any] = field(default_factory=dict)
    """The data of this generation's ``straggler`` job event as last written ({}: none yet)."""
    rendezvous_reported: bool = False
    """The ``rendezvous-timeout`` events of this generation are written."""


class HealthLoop:
    def __init__(self, handle: ControllerHandle, recovery: Recovery, settings: HealthSettings) -> None:
        self.c = handle
        self.recovery = recovery
        """Where the loop asks for plan changes (rebalance, migration, drain)."""
        self.settings = settings
        self._jobs: dict[str, _JobMemory] = {}
        self._drained: set[str] = set()
        self._rebalanced_for: dict[str, frozenset[int]] = {}
        """job -> the flagged ranks its last rebalance was for. Measured per-sample speeds are
        biased by per-step fixed costs (a rank with fewer samples looks slower per sample), so
        re-deciding from the rebalanced shares would shrink the slow rank's share step after
        step; a job is rebalanced again only for a different set of slow ranks."""
        self._evicted: dict[str, set[tuple[str, int]]] = {}
        """job -> the (node, slot)s it evicted stragglers from: no longer a spare for that job (the
        slow hardware is still there; a second eviction must not bring a rank back to it). Kept by
        this leader only (a new leader may evict to such a slot once more)."""
        self._startups: dict[str, dict[int, float]] = {}
        """job -> pid -> measured worker start-up (seconds), kept after the worker is gone."""
        self.actions: list[tuple[str, str, str]] = []
        """(kind, target, reason) of every action taken (logs, tests)."""

    async def run(self) -> None:
        await self.c.cache.synced.wait()
        while True:
            try:
                await self.tick(time.time())
            except (EtcdUnavailable, asyncio.TimeoutError) as exc:
                log.warning("health pass: etcd unavailable (will retry): %r", exc)
            except EtcdError as exc:  # permanent for that request: this pass is skipped, the next one starts over
                log.error("health pass skipped: etcd refused a request: %s", exc)
            except Exception:  # a bug in one pass must not stop detection for good
                log.exception("health pass failed")
            await asyncio.sleep(self.settings.interval_s)

    async def tick(self, now: float) -> None:
        jobs = jobs_from(self.c.cache)
        nodes = nodes_from(self.c.cache, jobs)
        for job in jobs.values():
            if job.active and job.plan is not None:
                await self._check_job(job, nodes, now)
        for gone in set(self._jobs) - {j.id for j in jobs.values() if j.active}:
            del self._jobs[gone]
            self._rebalanced_for.pop(gone, None)
            self._evicted.pop(gone, None)
            self._startups.pop(gone, None)
        if self.settings.drain_degraded:
            await self._drain_degraded(nodes)

    def _memory(self, job: JobView, now: float) -> _JobMemory:
        memory = self._jobs.get(job.id)
        if memory is None or memory.generation != job.plan.generation:
            memory = _JobMemory(generation=job.plan.generation, seen_at=now)
            self._jobs[job.id] = memory
        return memory

    async def _check_job(self, job: JobView, nodes: Mapping[str, NodeSummary], now: float) -> None:
        memory = self._memory(job, now)
        raw = list(self.c.cache.prefixed(self.c.keys.job_telemetry(job.id)).values())
        ranks = telemetry_ranks(raw)
        since = telemetry_since(synced=self.c.cache.synced.is_set(), synced_at=self.c.cache.synced_at,
                                generation_seen_at=memory.seen_at)
        if job.status.phase in HANG_CHECKED_PHASES and since is not None:
            if await self._check_rendezvous(job, ranks, memory, now, since):
                return  # re-planning around ranks that never arrived: nothing else to judge in this generation
            await self._check_hang(job, ranks, memory, now, since)
        await self._check_stragglers(job, ranks, nodes, memory, now)

    # ---------------------------------------------------------------- rendezvous deadline
    async def _check_rendezvous(self, job: JobView, ranks, memory: _JobMemory, now: float, since: float) -> bool:
        """True if ranks of the generation missed its rendezvous deadline. The re-plan is asked
        for on every pass until the plan moves on (it is guarded by the generation: a pass that
        still sees the old plan is refused, and one that could not re-plan yet tries again).
        ``since``: from when absence counts (``telemetry_since``)."""
        known = self._startups.setdefault(job.id, {})
        known.update(startup_samples(ranks))
        for pid in list(known)[:-MAX_STARTUP_SAMPLES]:
            del known[pid]
        state = rendezvous_state(job.plan, ranks, seen_at=since, startups=list(known.values()))
        decision, reason = decide_rendezvous(state, now, self.settings.rendezvous)
        if not decision.missing_ranks:
            return False
        plan = job.plan
        if not memory.rendezvous_reported:
            log.warning("job %s generation %d abandoned: %s", job.id, plan.generation, reason)
            made = []
            for rank in decision.missing_ranks:
                a = plan.worker(rank)
                made.append(rendezvous_timeout_event(rank=rank, node=a.node, slot=a.slot, generation=plan.generation,
                                                     deadline_s=decision.deadline_s, waited_s=decision.waited_s,
                                                     reason=reason, now=now))
            await write_events(self.c, job.id, made)
            memory.rendezvous_reported = True
        where = ", ".join(f"rank {r} on {plan.worker(r).node} slot {plan.worker(r).slot}"
                          for r in decision.missing_ranks)
        cause = (f"rendezvous-timeout: {where} did not reach the rendezvous of generation {plan.generation} "
                 f"within {decision.deadline_s:.1f} s")
        done, why = await self.recovery.request_replan(job.id, cause, lost_ranks=decision.missing_ranks,
                                                       detected_at=now, generation=plan.generation)
        if done:
            self.actions.append(("rendezvous-timeout", job.id, reason))
        elif memory.last_reason != why:
            memory.last_reason = why
            log.warning("job %s: re-plan around ranks %s not done: %s", job.id, list(decision.missing_ranks), why)
        return True

    # ---------------------------------------------------------------- hang
    async def _check_hang(self, job: JobView, ranks, memory: _JobMemory, now: float, since: float) -> None:
        """``since``: from when silence counts (``telemetry_since``)."""
        decision, reason = hang_decision(job.plan, ranks, now, generation_seen_at=since,
                                         settings=self.settings.hang)
        # Flight Recorder dumps from every rank before the kill; the finding goes into the hang
        # event's evidence and the kill reason (controller/flight.py)
        new_hung = [r for r in decision.hung_ranks if r not in memory.killed]
        evidence: dict = {}
        if new_hung:
            began = time.monotonic()
            finding, why = await flight.diagnose_hang(self.c, job.id, job.plan, new_hung, now)
            took = time.monotonic() - began
            log.warning("job %s hang diagnosis in %.2f s: %s", job.id, took, why)
            # how long the dumps held the kill back: a phase of the hang's recovery time
            evidence = {"flight_recorder": finding.to_dict(), "flight_recorder_s": round(took, 3)}
            reason = f"{reason}; {finding.summary}"
        progress = {p.rank: p for p in rank_progress(job.plan, ranks, generation_seen_at=since)}
        for rank in decision.hung_ranks:
            if rank in memory.killed:
                continue
            memory.killed.add(rank)
            metrics.HANGS_DETECTED.labels(job.id).inc()
            log.warning("job %s rank %d declared hung: %s", job.id, rank, reason)
            p = progress.get(rank)
            silent = max(now - p.progress_at, 0.0) if p is not None else decision.timeout_s
            a = job.plan.worker(rank)
            # the kill's reason becomes the worker's root cause (its agent adds what it sees: SIGSTOP)
            record = chaos.rank_request(action="kill", plan=job.plan, job=job.id, rank=rank,
                                        reason=hang_cause(rank, silent, p.process_stopped if p else None), now=now)
            await write_events(self.c, job.id, [hang_event(
                rank=rank, node=a.node, slot=a.slot, silent_s=silent, timeout_s=decision.timeout_s,
                step=p.step if p is not None else 0, generation=job.plan.generation,
                stopped=p.process_stopped if p is not None else None, reason=reason, now=now, evidence=evidence)])
            await chaos.send(self.c.etcd, self.c.keys, record)
            self.actions.append(("kill", f"{job.id}/{rank}", reason))

    # ---------------------------------------------------------------- stragglers
    async def _check_stragglers(self, job: JobView, ranks, nodes, memory: _JobMemory, now: float) -> None:
        plan = job.plan
        window = step_window(plan, ranks)
        if not window:
            return
        # the window holds compute scaled to even shares, so the decision sees even shares too;
        # the shares it proposes depend only on the per-sample speeds
        even = even_shares(sum(plan.sample_shares), plan.dp)
        avoid = failed_slots(plan) | self._evicted.get(job.id, set())
        decision, reason = decide_straggler(
            window, policy=policy_of(job), shares=even, micro_batch=job.spec.micro_batch_size,
            pp=plan.pp, spare_available=spare_exists(nodes, avoid), settings=self.settings.straggler)
        for rank, score in decision.scores.items():
            metrics.STRAGGLER_SCORE.labels(job.id, str(rank)).set(score)
        self._comm_metrics(job, ranks)
        decided_at = window[-1].step
        recent, long_enough = decision_window(window, self.settings.straggler)
        comm, stage_of = comm_window(plan, ranks, min_steps=min(self.settings.straggler.window_steps,
                                                                 COMM_SUMMARY_STEPS))
        # one knob says how much slower compute must be to count, for flags and attribution alike
        judged = dataclasses.replace(self.settings.attribution, min_slowdown=self.settings.straggler.min_slowdown)
        attribution, why = attribute(comm, judged, stage_of) if comm and long_enough else (Attribution(), "")
        decision, spared = spare_link_ranks(decision, attribution)
        if spared:
            reason = f"{spared}; {reason}"
        new = [rank for rank in decision.flagged_ranks if rank not in memory.flagged]
        new_links = [link for link in attribution.links if (link.sender, link.receiver) not in memory.links]
        if new or new_links:
            # the record first: if etcd refuses it, the next pass flags (and counts) these ranks again
            event = straggler_event(memory.event, generation=plan.generation, policy=policy_of(job).value,
                                    flagged={r: decision.scores.get(r, 0.0) for r in new},
                                    decided_at_step=decided_at, seen_step=latest_step_seen(plan, ranks), now=now)
            if attribution.links or attribution.compute_ranks:
                event = with_attribution(event, attribution, why, step=decided_at)
            await self._write_event(job, memory, event, now)
            for link in new_links:
                memory.links.add((link.sender, link.receiver))
                metrics.SLOW_LINKS.labels(job.id).inc()
                log.warning("job %s slow link rank %d -> rank %d at step %d (no plan change: %s)", job.id,
                            link.sender, link.receiver, decided_at, why)
                self.actions.append(("link", f"{job.id}/{link.sender}->{link.receiver}", why))
            for rank in new:
                memory.flagged.add(rank)
                metrics.STRAGGLERS_FLAGGED.labels(job.id).inc()
                log.warning("job %s rank %d flagged as a straggler at step %d: %s", job.id, rank, decided_at, reason)
                self.actions.append(("flag", f"{job.id}/{rank}", reason))
        if memory.acted or job.status.phase != "RUNNING" or len(recent) < self.settings.straggler.window_steps \
                or not long_enough:
            return  # one plan per generation; decide only on a full window
        if decision.action is StragglerAction.REBALANCE:
            if self._rebalanced_for.get(job.id) == frozenset(decision.flagged_ranks):
                if memory.last_reason != "rebalanced":
                    memory.last_reason = "rebalanced"
                    log.info("job %s: ranks %s already rebalanced for; alert only (%s)", job.id,
                             list(decision.flagged_ranks), reason)
                return
            speeds = per_sample_seconds(recent, even, plan.pp)
            if not worth_rebalancing(plan.sample_shares, decision.shares, [speeds[d] for d in range(plan.dp)],
                                     self.settings.min_rebalance_gain):
                if memory.last_reason != "balanced":
                    memory.last_reason = "balanced"
                    log.info("job %s: shares %s already fit the ranks' speeds (%s)", job.id,
                             list(plan.sample_shares), reason)
                return
            at_step = decided_at + self.settings.switch_ahead_steps
            await self._request(job, memory, "rebalance", reason, decided_at, decision.flagged_ranks, now,
                                self.recovery.request_rebalance(job.id, list(decision.shares), at_step=at_step,
                                                                  cause="straggler-rebalance"))
            if memory.acted:
                self._rebalanced_for[job.id] = frozenset(decision.flagged_ranks)
        elif decision.action is StragglerAction.EVICT:
            await self._request(job, memory, "evict", reason, decided_at, decision.evict_ranks, now,
                                self.recovery.request_migration(job.id, decision.evict_ranks,
                                                                  cause="straggler-evict"))
            if memory.acted:
                self._evicted.setdefault(job.id, set()).update(
                    (w.node, w.slot) for w in plan.workers if w.rank in decision.evict_ranks)
        elif decision.action is StragglerAction.ALERT and memory.last_reason != "alert":
            memory.last_reason = "alert"
            log.warning("job %s straggler (alert only): %s", job.id, reason)

    def _comm_metrics(self, job: JobView, ranks) -> None:
        values = link_waits(job.plan, ranks)
        for (sender, receiver), seconds in values.items():
            metrics.LINK_WAIT.labels(job.id, sender, receiver).set(seconds)
        for labels in list(metrics.LINK_WAIT._metrics):  # edges of an older layout go
            if labels[0] == job.id and (labels[1], labels[2]) not in values:
                metrics.LINK_WAIT.remove(*labels)

    async def _request(self, job: JobView, memory: _JobMemory, kind: str, reason: str, decided_at: int,
                       ranks: Sequence[int], now: float, call) -> None:
        done, why = await call
        if done:
            memory.acted = True
            self.actions.append((kind, job.id, reason))
            log.warning("job %s straggler %s requested at step %d: %s (%s)", job.id, kind, decided_at, why, reason)
            base = memory.event or straggler_event({}, generation=memory.generation, policy=policy_of(job).value,
                                                   flagged={}, decided_at_step=decided_at, seen_step=decided_at, now=now)
            event = with_action(base, action=kind, decided_at_step=decided_at, reason=why, ranks=ranks)
            try:  # the plan is written: a lost record must not make this pass ask again
                await self._write_event(job, memory, event, now)
            except (EtcdError, EtcdUnavailable, asyncio.TimeoutError) as exc:
                log.warning("job %s: straggler event not written: %r", job.id, exc)
        elif memory.last_reason != why:
            memory.last_reason = why
            log.info("job %s straggler %s refused: %s", job.id, kind, why)

    async def _write_event(self, job: JobView, memory: _JobMemory, data: dict[str, Any], now: float) -> None:
        """Write this generation's ``straggler`` job event (raises EtcdError; ``memory.event`` is
        updated only once it is written)."""
        key = self.c.keys.job_event(job.id, memory.generation * 10 + STRAGGLER_EVENT_PART)
        steps = [int(v.get("step", 0) or 0) for v in (data.get("flagged") or {}).values() if isinstance(v, dict)]
        steps.append(int((data.get("attribution") or {}).get("step", 0) or 0))
        record = events.new_event("straggler", events.describe(JobEventRecord(kind="straggler", time=now, data=data)),
                                  now=now, step=int(data.get("action_step") or max(steps, default=0)),
                                  action=str(data.get("action", "")), data=data)
        await self.c.etcd.put(key, record.to_json())
        memory.event = data

    # ---------------------------------------------------------------- degraded GPUs
    async def _drain_degraded(self, nodes: Mapping[str, NodeSummary]) -> None:
        for node, reason in nodes_to_drain(nodes):
            if node in self._drained:
                continue
            done, why = await self.recovery.request_drain(node, reason)
            if done:
                self._drained.add(node)
                self.actions.append(("drain", node, reason))
                log.warning("node %s drained: %s", node, reason)
        # once a node reports HEALTHY again (repaired), a new bad condition drains it again;
        # an operator who uncordons a node that still reports bad health is not overruled
        self._drained -= {n.id for n in nodes.values() if str(n.record.get("condition", "HEALTHY")) == "HEALTHY"}
