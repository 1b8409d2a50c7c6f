"""Hang and straggler decisions: pure functions of (telemetry, now) -> (decision, reason).

Nothing here reads a clock, etcd or the network. The controller gathers the
telemetry the agents relay, calls these functions, and acts on the decision
(kill a rank, write a plan with new sample shares, evict to a spare, raise an
alert). Keeping the decisions pure lets the tests drive them with synthetic,
seeded telemetry and exact timestamps.

Hang: a rank that has not completed a step for ``max(k * median step time,
floor)`` is hung. In a synchronous job one stuck rank stalls every rank (the
others block in the next collective), so the stalled ranks are narrowed down
to the ones that caused it, from the strongest evidence to the weakest: a
process the agent sees stopped by a signal (SIGSTOP), a rank that also stopped
sending heartbeats (a frozen process or host), a rank behind the others' step,
a rank not waiting in a collective (a stuck kernel, a deadlock in compute).
A rank that crossed the timeout first is not blamed for that alone while no
rank got past its step: in lockstep the others finished that step milliseconds
later and are about to cross it too, and the next pass compares them all.
Progress times are when the step completed (not when the agent relayed it),
so the agent's write throttling must stay well below ``floor_s``.

Straggler: every rank's step takes the same wall time (the fast ranks wait for
the slow one in collectives), so the statistic uses compute time
(forward + backward) instead: a robust z-score against the median across
the ranks of the same pipeline stage, in MAD units, flagged when it stays high
over a window of steps. The window is ``window_steps`` steps and, when step
times are known, at least ``min_window_s`` seconds (``decision_window``): with
steps of a few dozen milliseconds, a host busy with something else for one
second makes one rank slow for a whole window of steps, and a plan change is
not worth a blip.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826

MAX_WINDOW_STEPS = 60
"""The time floor (``StragglerSettings.min_window_s``) never stretches a window past this many
steps: the agents relay each rank's last 64 steps (agent/rank_health.py ``KEEP_STEPS``)."""


# --------------------------------------------------------------------- hang
@dataclass(kw_only=True)
class HangSettings:
    k: float = 5.0
    """No-progress timeout as a multiple of the median step time (dimensionless, > 1)."""
    floor_s: float = 10.0
    """Shortest no-progress timeout (seconds, > 0); absorbs jitter of very short steps."""
    startup_timeout_s: float = 300.0
    """Timeout before any step time is known (seconds, >= floor_s): the first step
    includes communicator setup and warm-up, which a median cannot predict."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.k) and self.k > 1.0):
            raise ValueError(f"k: must be a finite number > 1, got {self.k}")
        if not (math.isfinite(self.floor_s) and self.floor_s > 0):
            raise ValueError(f"floor_s: must be > 0 seconds, got {self.floor_s}")
        if not (math.isfinite(self.startup_timeout_s) and self.startup_timeout_s >= self.floor_s):
            raise ValueError(
                f"startup_timeout_s: must be >= floor_s={self.floor_s} seconds, got {self.startup_timeout_s}"
            )


@dataclass(kw_only=True, frozen=True)
class RankProgress:
    """What the controller knows about one rank's liveness (times on one clock, seconds)."""

    rank: int
    step: int
    """Last completed step."""
    progress_at: float
    """When ``step`` completed (or when the rank started, before its first step)."""
    heartbeat_at: float | None = None
    """When the rank last sent anything (a telemetry thread keeps sending while the
    main thread waits); None when the transport has no separate heartbeat."""
    in_collective: bool | None = None
    """True if the rank last said it is waiting in a collective; None if unknown."""
    process_stopped: bool | None = None
    """True if the agent sees the worker process stopped by a signal (SIGSTOP/SIGTSTP:
    ``psutil.Process(pid).status() == "stopped"``); None if unknown."""


@dataclass(kw_only=True, frozen=True)
class HangDecision:
    hung_ranks: tuple[int, ...] = ()
    """Ranks to kill (empty: nothing is hung)."""
    stalled_ranks: tuple[int, ...] = ()
    """Every rank past the timeout, culprits and the ranks blocked behind them."""
    timeout_s: float = 0.0
    """The no-progress timeout that applied (seconds)."""


def hang_timeout_s(recent_step_times_s: Sequence[float], settings: HangSettings) -> float:
    """max(k * median step time, floor); the startup timeout while no step time is known."""
    durations = [t for t in recent_step_times_s if t > 0 and math.isfinite(t)]
    if not durations:
        return settings.startup_timeout_s
    return max(settings.k * statistics.median(durations), settings.floor_s)


def detect_hang(
    ranks: Sequence[RankProgress],
    recent_step_times_s: Sequence[float],
    now: float,
    settings: HangSettings,
) -> tuple[HangDecision, str]:
    """Decide which ranks are hung at time ``now``."""
    timeout = hang_timeout_s(recent_step_times_s, settings)
    # A timestamp from the future (clock skew between hosts) counts as fresh, never as stale.
    stalled = [r for r in ranks if now - r.progress_at > timeout]
    if not stalled:
        oldest = max((now - r.progress_at for r in ranks), default=0.0)
        return HangDecision(timeout_s=timeout), (
            f"no hang: oldest progress {max(oldest, 0.0):.1f}s ago, timeout {timeout:.1f}s"
        )
    culprits, why = _hang_culprits(stalled, ranks, now, timeout)
    if not culprits:
        return HangDecision(stalled_ranks=tuple(sorted(r.rank for r in stalled)), timeout_s=timeout), why
    decision = HangDecision(
        hung_ranks=tuple(sorted(r.rank for r in culprits)),
        stalled_ranks=tuple(sorted(r.rank for r in stalled)),
        timeout_s=timeout,
    )
    details = ", ".join(f"rank {r.rank} at step {r.step} for {now - r.progress_at:.1f}s" for r in culprits)
    return decision, f"hung ({why}; timeout {timeout:.1f}s): {details}"


def _hang_culprits(
    stalled: Sequence[RankProgress], ranks: Sequence[RankProgress], now: float, timeout: float
) -> tuple[list[RankProgress], str]:
    """Pick the ranks that caused the stall rather than those blocked behind them (none yet:
    wait for the next pass)."""
    stopped = [r for r in stalled if r.process_stopped]
    if stopped:
        return stopped, "no progress, process stopped by a signal"
    silent = [r for r in stalled if r.heartbeat_at is not None and now - r.heartbeat_at > timeout]
    if silent:
        return silent, "no progress and no heartbeat"
    if len(stalled) < len(ranks):
        if max(r.step for r in ranks) > max(r.step for r in stalled):
            return list(stalled), "no progress while the other ranks progress"
        # Nobody got past the stalled ranks' step: the others finished it a few milliseconds
        # later and will cross the timeout next. Blaming whoever crossed first picked a rank
        # blocked behind a SIGSTOP'd one (all at one step, its last line 10 ms older).
        return [], (f"not yet: rank(s) {sorted(r.rank for r in stalled)} stalled first, "
                    "but no rank got past their step")
    behind_step = min(r.step for r in stalled)
    behind = [r for r in stalled if r.step == behind_step]
    if len(behind) < len(stalled):
        return behind, "no progress, behind the other stalled ranks"
    not_waiting = [r for r in stalled if r.in_collective is False]
    if not_waiting and len(not_waiting) < len(stalled):
        return not_waiting, "no progress outside a collective while the others wait for it"
    return list(stalled), "no progress; the stalled ranks cannot be told apart"


# ---------------------------------------------------------------- straggler
class StragglerPolicy(enum.Enum):
    """What to do about a persistent straggler (the job spec's ``elastic.straggler_policy``)."""

    REBALANCE = "rebalance"
    EVICT = "evict"
    ALERT = "alert"


class StragglerAction(enum.Enum):
    NONE = "none"
    ALERT = "alert"
    REBALANCE = "rebalance"
    EVICT = "evict"


@dataclass(kw_only=True)
class StragglerSettings:
    z_threshold: float = 3.5
    """Robust z-score (MAD units) above which a rank is slow in one step (> 0)."""
    min_slowdown: float = 0.05
    """A rank is slow in a step only if its compute time is also at least this fraction
    above the median (0.05 = 5%); a tiny but consistent difference is not worth a plan."""
    min_step_cost: float = 0.02
    """A rank is slow in a step only if its compute also exceeds its stage's median by at least
    this fraction of the step's wall time, when that is known (0.02 = 2%): a rank some
    milliseconds slower in a step that waits on links or collectives for most of its time
    costs the job nothing a plan change would win back."""
    mad_floor: float = 0.02
    """Smallest spread used for the z-score, as a fraction of the median compute time;
    stops near-identical ranks from dividing by ~0."""
    window_steps: int = 20
    """Recent steps the decision looks at (steps, >= 1)."""
    min_window_s: float = 2.0
    """The window also spans at least this many seconds of steps when step times are known
    (seconds, >= 0; at most ``MAX_WINDOW_STEPS`` steps): a rank slow for less is not flagged."""
    flag_fraction: float = 0.8
    """Fraction of the window in which a rank must be slow to be flagged (0, 1]."""
    evict_slowdown: float = 0.3
    """With policy ``evict``: a rank slow through the window (as for a flag) whose median compute
    per sample is at least this fraction (0.3 = 30%) above its peers' is replaced by a spare,
    if one exists."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z_threshold) and self.z_threshold > 0):
            raise ValueError(f"z_threshold: must be > 0, got {self.z_threshold}")
        if not (math.isfinite(self.min_slowdown) and self.min_slowdown >= 0):
            raise ValueError(f"min_slowdown: must be >= 0, got {self.min_slowdown}")
        if not (math.isfinite(self.min_step_cost) and 0 <= self.min_step_cost < 1):
            raise ValueError(f"min_step_cost: must be in [0, 1), got {self.min_step_cost}")
        if not (math.isfinite(self.mad_floor) and self.mad_floor > 0):
            raise ValueError(f"mad_floor: must be > 0, got {self.mad_floor}")
        if isinstance(self.window_steps, bool) or not isinstance(self.window_steps, int) or self.window_steps < 1:
            raise ValueError(f"window_steps: must be an integer >= 1, got {self.window_steps!r}")
        if not (math.isfinite(self.min_window_s) and self.min_window_s >= 0):
            raise ValueError(f"min_window_s: must be >= 0 seconds, got {self.min_window_s}")
        if not 0 < self.flag_fraction <= 1:
            raise ValueError(f"flag_fraction: must be in (0, 1], got {self.flag_fraction}")
        if not (math.isfinite(self.evict_slowdown) and self.evict_slowdown > 0):
            raise ValueError(f"evict_slowdown: must be > 0, got {self.evict_slowdown}")

    @property
    def min_flagged_steps(self) -> int:
        """Slow steps within a window of ``window_steps`` needed to flag a rank."""
        return self.flagged_steps_needed(self.window_steps)

    def flagged_steps_needed(self, window_len: int) -> int:
        """Slow steps needed to flag a rank in a window of ``window_len`` steps (never fewer than
        in a window of ``window_steps``)."""
        return math.ceil(self.flag_fraction * max(window_len, self.window_steps) - 1e-9)


@dataclass(kw_only=True, frozen=True)
class StepTiming:
    """One step's per-rank timing (seconds), as relayed by the agents."""

    step: int
    compute_s: Mapping[int, float]
    """Forward + backward time per global rank."""
    collective_wait_s: Mapping[int, float] = field(default_factory=dict)
    """Time spent waiting in collectives per rank (optional; used in the reason only)."""
    step_time_s: float = 0.0
    """Wall time of the step (seconds; 0: unknown); sizes the window in time."""


@dataclass(kw_only=True, frozen=True)
class StragglerDecision:
    action: StragglerAction = StragglerAction.NONE
    flagged_ranks: tuple[int, ...] = ()
    """Global ranks slow in at least ``min_flagged_steps`` of the window."""
    scores: Mapping[int, float] = field(default_factory=dict)
    """Latest robust z-score per rank (for the ``tenax_straggler_score`` gauge)."""
    shares: tuple[int, ...] = ()
    """With REBALANCE: the new per-dp-rank sample shares (sum = global batch)."""
    evict_ranks: tuple[int, ...] = ()
    """With EVICT: the global ranks to move to a spare."""


def _references(
    compute_s: Mapping[int, float], settings: StragglerSettings, pp: int = 1
) -> dict[int, tuple[float, float]]:
    """Per rank: (the compute time it is compared with, the spread that is one unit).

    Ranks are compared only with ranks of the same pipeline stage (rank % pp):
    stages own different layers, so their compute times differ by design.
    """
    stages: dict[int, dict[int, float]] = {}
    for rank, t in compute_s.items():
        stages.setdefault(rank % pp, {})[rank] = t
    references: dict[int, tuple[float, float]] = {}
    for stage in stages.values():
        references.update(_stage_references(stage, settings))
    return references


def _stage_references(compute_s: Mapping[int, float], settings: StragglerSettings) -> dict[int, tuple[float, float]]:
    """Three or more ranks: the median and max(1.4826 * MAD, mad_floor * median).

    With two ranks the median sits halfway between them and every score would
    be +-0.67 whatever the gap, so each rank is compared with the other one
    instead (the spread of a single value is 0, so the floor applies). A rank
    alone in its stage has nothing to be compared with: score 0.
    """
    if len(compute_s) < 2:
        return {rank: (t, 0.0) for rank, t in compute_s.items()}
    if len(compute_s) == 2:
        (a, ta), (b, tb) = compute_s.items()
        return {a: (tb, settings.mad_floor * tb), b: (ta, settings.mad_floor * ta)}
    values = list(compute_s.values())
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    scale = max(MAD_TO_SIGMA * mad, settings.mad_floor * median)
    return {rank: (median, scale) for rank in compute_s}


def robust_scores(compute_s: Mapping[int, float], settings: StragglerSettings, pp: int = 1) -> dict[int, float]:
    """(compute - median) / max(1.4826 * MAD, mad_floor * median) for every rank of one step,
    within its pipeline stage."""
    references = _references(compute_s, settings, pp)
    return {rank: _z(t, *references[rank]) for rank, t in compute_s.items()}


def _z(value: float, center: float, scale: float) -> float:
    return (value - center) / scale if scale > 0 else 0.0


def _slow_in_step(timing: StepTiming, settings: StragglerSettings, pp: int) -> set[int]:
    """Ranks whose compute time is a robust outlier, materially above the median, and by a
    part of the step that matters (``min_step_cost``)."""
    slow = set()
    compute_s = timing.compute_s
    for rank, (center, scale) in _references(compute_s, settings, pp).items():
        t = compute_s[rank]
        if _z(t, center, scale) > settings.z_threshold and t >= (1 + settings.min_slowdown) * center \
                and t - center >= settings.min_step_cost * timing.step_time_s:
            slow.add(rank)
    return slow


def decision_window(window: Sequence[StepTiming], settings: StragglerSettings) -> tuple[list[StepTiming], bool]:
    """The recent steps a straggler decision looks at, and whether they span enough time.

    The last ``window_steps`` steps, stretched back (up to ``MAX_WINDOW_STEPS``) until they span
    ``min_window_s`` seconds. When a step's time is unknown (0), the step count alone decides.
    The bool is False while the available steps span less than ``min_window_s`` (and are fewer
    than ``MAX_WINDOW_STEPS``): too little evidence to flag anyone yet.
    """
    start = max(len(window) - settings.window_steps, 0)
    if any(t.step_time_s <= 0 for t in window[start:]):
        return list(window[start:]), True
    span = sum(t.step_time_s for t in window[start:])
    limit = max(settings.window_steps, MAX_WINDOW_STEPS)
    while span < settings.min_window_s and start > 0 and len(window) - start < limit \
            and window[start - 1].step_time_s > 0:
        start -= 1
        span += window[start].step_time_s
    recent = list(window[start:])
    return recent, span >= settings.min_window_s or len(recent) >= limit


def flag_stragglers(
    window: Sequence[StepTiming], settings: StragglerSettings, pp: int = 1
) -> tuple[tuple[int, ...], dict[int, int]]:
    """Ranks slow in at least ``flag_fraction`` of the decision window (``decision_window``;
    never fewer than ``min_flagged_steps``), and how many slow steps each rank had there."""
    recent, long_enough = decision_window(window, settings)
    slow_steps: dict[int, int] = {}
    for timing in recent:
        for rank in _slow_in_step(timing, settings, pp):
            slow_steps[rank] = slow_steps.get(rank, 0) + 1
    if not long_enough:
        return (), slow_steps
    need = settings.flagged_steps_needed(len(recent))
    flagged = tuple(sorted(r for r, n in slow_steps.items() if n >= need))
    return flagged, slow_steps


def per_sample_seconds(
    window: Sequence[StepTiming], shares: Sequence[int], pp: int
) -> dict[int, float]:
    """Median compute seconds per sample of every dp rank over the window.

    A data-parallel replica is as fast as its slowest pipeline stage, so its
    time is the largest stage compute time (ranks are dp-major:
    rank = dp_rank * pp + pp_rank).
    """
    per_step: dict[int, list[float]] = {dp: [] for dp in range(len(shares))}
    for timing in window:
        replica_time: dict[int, float] = {}
        for rank, t in timing.compute_s.items():
            dp = rank // pp
            if dp in per_step:
                replica_time[dp] = max(replica_time.get(dp, 0.0), t)
        for dp, t in replica_time.items():
            per_step[dp].append(t / shares[dp])
    return {dp: statistics.median(ts) for dp, ts in per_step.items() if ts}


def rebalance_shares(
    seconds_per_sample: Mapping[int, float], global_batch: int, min_share: int
) -> tuple[int, ...]:
    """Integer sample shares proportional to throughput (1 / seconds per sample).

    Shares sum to ``global_batch`` exactly and each is at least ``min_share``
    (the micro-batch: a rank must run at least one full micro-batch). Largest
    remainder rounding; ties go to the lower dp rank, so the result is
    deterministic.
    """
    n = len(seconds_per_sample)
    if n == 0:
        raise ValueError("seconds_per_sample: needs at least one dp rank")
    if sorted(seconds_per_sample) != list(range(n)):
        raise ValueError(f"seconds_per_sample: keys must be dp ranks 0..{n - 1}, got {sorted(seconds_per_sample)}")
    if any(not (math.isfinite(t) and t > 0) for t in seconds_per_sample.values()):
        raise ValueError("seconds_per_sample: every value must be a positive number of seconds")
    if min_share < 1:
        raise ValueError(f"min_share: must be >= 1, got {min_share}")
    if n * min_share > global_batch:
        raise ValueError(f"global_batch: {global_batch} cannot give {n} dp ranks at least {min_share} samples each")

    throughput = {dp: 1.0 / t for dp, t in seconds_per_sample.items()}
    # Ranks whose proportional share falls below the minimum get the minimum;
    # the rest split what is left, again in proportion. Repeat until stable.
    pinned: set[int] = set()
    while True:
        free = [dp for dp in range(n) if dp not in pinned]
        budget = global_batch - min_share * len(pinned)
        total = sum(throughput[dp] for dp in free)
        ideal = {dp: budget * throughput[dp] / total for dp in free}
        newly_pinned = {dp for dp, x in ideal.items() if x < min_share}
        if not newly_pinned:
            break
        pinned |= newly_pinned

    shares = {dp: min_share for dp in pinned}
    shares.update({dp: math.floor(x) for dp, x in ideal.items()})  # every free x >= min_share
    leftover = global_batch - sum(shares.values())
    by_remainder = sorted(ideal, key=lambda dp: (-(ideal[dp] - math.floor(ideal[dp])), dp))
    for dp in by_remainder[:leftover]:
        shares[dp] += 1
    return tuple(shares[dp] for dp in range(n))


def decide_straggler(
    window: Sequence[StepTiming],
    *,
    policy: StragglerPolicy,
    shares: Sequence[int],
    micro_batch: int,
    pp: int = 1,
    spare_available: bool = False,
    settings: StragglerSettings,
) -> tuple[StragglerDecision, str]:
    """Decide what to do about slow ranks, given the job's recent step timings.

    ``shares`` are the current per-dp-rank sample shares of the plan; their sum
    is the global batch, which a rebalance keeps. ``window`` is the most recent
    steps, oldest first (only the ``decision_window`` of it is used), all run under
    these shares: the caller starts a new window when a plan changes them, or
    the per-sample speeds would mix two share layouts.
    """
    if pp < 1:
        raise ValueError(f"pp: must be >= 1, got {pp}")
    if not shares or any(s < 1 for s in shares):
        raise ValueError(f"shares: need one positive share per dp rank, got {list(shares)}")
    recent, _ = decision_window(window, settings)
    if not recent:
        return StragglerDecision(), "no step timings yet"
    scores = robust_scores(recent[-1].compute_s, settings, pp)
    flagged, slow_steps = flag_stragglers(window, settings, pp)
    per_sample = per_sample_seconds(recent, shares, pp)

    if policy is StragglerPolicy.EVICT:
        evict = _persistently_slow_per_sample(window, shares, pp, settings)
        if evict and spare_available:
            # a rank evicted for being slow is a flagged straggler too, even if its z-score
            # criterion has not filled the window yet
            return StragglerDecision(
                action=StragglerAction.EVICT, flagged_ranks=tuple(sorted(set(flagged) | set(evict))),
                scores=scores, evict_ranks=evict,
            ), (
                f"evict ranks {list(evict)}: slower per sample than their peers in "
                f"{settings.flagged_steps_needed(len(recent))}+ of the last {len(recent)} steps, by at least "
                f"{settings.evict_slowdown:.0%} (median), and a spare exists"
            )
    if not flagged:
        return StragglerDecision(scores=scores), (
            f"no straggler in the last {len(recent)} steps (max score {max(scores.values(), default=0.0):.1f})"
        )

    evidence = _evidence(recent, flagged, slow_steps, settings, pp)
    if policy is StragglerPolicy.ALERT or len(shares) < 2:
        why = "policy is alert" if policy is StragglerPolicy.ALERT else "a single dp rank has nothing to rebalance"
        return StragglerDecision(action=StragglerAction.ALERT, flagged_ranks=flagged, scores=scores), (
            f"alert only ({why}): {evidence}"
        )

    if len(per_sample) < len(shares):
        return StragglerDecision(action=StragglerAction.ALERT, flagged_ranks=flagged, scores=scores), (
            f"alert only (no timing for every dp rank, cannot rebalance): {evidence}"
        )
    new_shares = rebalance_shares(per_sample, sum(shares), max(1, micro_batch))
    fallback = " (policy evict, but no spare or not slow enough to evict)" if policy is StragglerPolicy.EVICT else ""
    if new_shares == tuple(shares):
        return StragglerDecision(action=StragglerAction.ALERT, flagged_ranks=flagged, scores=scores), (
            f"alert only (shares {list(shares)} already match throughput){fallback}: {evidence}"
        )
    return StragglerDecision(
        action=StragglerAction.REBALANCE, flagged_ranks=flagged, scores=scores, shares=new_shares
    ), f"rebalance shares {list(shares)} -> {list(new_shares)}{fallback}: {evidence}"


def _persistently_slow_per_sample(
    window: Sequence[StepTiming], shares: Sequence[int], pp: int, settings: StragglerSettings
) -> tuple[int, ...]:
    """Global ranks to evict: over the decision window, slower per sample than the median of
    the other ranks of their stage (by ``min_slowdown``) in as many steps as a flag needs, and
    by at least ``evict_slowdown`` in the median over the window. Per sample, so a rank that a
    rebalance has already relieved still counts as slow hardware. The persistence and the size
    are judged apart so that a few noisy steps near the threshold do not turn an eviction into
    a rebalance (and a second plan change later)."""
    recent, long_enough = decision_window(window, settings)
    if not long_enough:
        return ()
    ratios: dict[int, list[float]] = {}
    for timing in recent:
        per_sample = {r: t / shares[r // pp] for r, t in timing.compute_s.items() if r // pp < len(shares)}
        for rank, t in per_sample.items():
            peers = [x for r, x in per_sample.items() if r != rank and r % pp == rank % pp]
            if peers and statistics.median(peers) > 0:
                ratios.setdefault(rank, []).append(t / statistics.median(peers))
    need = settings.flagged_steps_needed(len(recent))
    return tuple(sorted(
        r for r, xs in ratios.items()
        if sum(x >= 1 + settings.min_slowdown for x in xs) >= need
        and statistics.median(xs) >= 1 + settings.evict_slowdown))


def _evidence(
    window: Sequence[StepTiming], flagged: Sequence[int], slow_steps: Mapping[int, int],
    settings: StragglerSettings, pp: int,
) -> str:
    """A readable account of why each flagged rank was flagged."""
    last = window[-1]
    compute = last.compute_s
    parts = []
    for rank in flagged:
        peers = [t for r, t in compute.items() if r != rank and r % pp == rank % pp]
        median = statistics.median(peers) if peers else compute.get(rank, 0.0)
        text = (
            f"rank {rank} slow in {slow_steps[rank]}/{len(window)} steps, "
            f"compute {compute.get(rank, float('nan')):.3f}s vs median of its peers {median:.3f}s"
        )
        waits = [t for r, t in last.collective_wait_s.items() if r != rank]
        if waits and rank in last.collective_wait_s:
            text += (
                f", waits {last.collective_wait_s[rank]:.3f}s in collectives while the others "
                f"wait {statistics.median(waits):.3f}s"
            )
        parts.append(text)
    return "; ".join(parts) + f" (threshold z > {settings.z_threshold})"
