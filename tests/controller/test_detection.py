"""Hang and straggler decisions, driven by synthetic, seeded telemetry."""

from __future__ import annotations

import random

import pytest

from controller.detection import (
    HangSettings,
    RankProgress,
    StepTiming,
    StragglerAction,
    StragglerPolicy,
    StragglerSettings,
    decide_straggler,
    detect_hang,
    flag_stragglers,
    hang_timeout_s,
    rebalance_shares,
    robust_scores,
)


# --------------------------------------------------------------------- hang
def _sigstop_job(world: int, stopped: int, stop_at: float, now: float, step: int) -> list[RankProgress]:
    """Every rank completed `step` at `stop_at`; then `stopped` froze (SIGSTOP: no
    heartbeat either) and the others block in the next all-reduce, still heartbeating."""
    ranks = []
    for rank in range(world):
        frozen = rank == stopped
        ranks.append(
            RankProgress(
                rank=rank,
                step=step,
                progress_at=stop_at,
                heartbeat_at=stop_at if frozen else now - 0.5,
                in_collective=None if frozen else True,
            )
        )
    return ranks


def test_timeout_is_k_times_median_or_floor():
    settings = HangSettings(k=5, floor_s=10, startup_timeout_s=60)
    assert hang_timeout_s([4.0, 4.2, 3.9, 40.0], settings) == pytest.approx(5 * 4.1)  # median ignores the outlier
    assert hang_timeout_s([0.1, 0.12, 0.11], settings) == 10  # floor
    assert hang_timeout_s([], settings) == 60  # nothing measured yet


@pytest.mark.parametrize("step_time_s, expected_timeout_s", [(4.0, 20.0), (0.2, 10.0)])
def test_sigstopped_rank_is_hung_after_timeout_and_not_before(step_time_s, expected_timeout_s):
    settings = HangSettings(k=5, floor_s=10)
    rng = random.Random(7)
    step_times = [step_time_s * rng.uniform(0.95, 1.05) for _ in range(50)]
    timeout = hang_timeout_s(step_times, settings)
    assert timeout == pytest.approx(expected_timeout_s, rel=0.05)

    stop_at = 1000.0
    just_before = stop_at + timeout - 0.01
    decision, reason = detect_hang(_sigstop_job(4, 2, stop_at, just_before, 99), step_times, just_before, settings)
    assert decision.hung_ranks == () and reason.startswith("no hang")

    just_after = stop_at + timeout + 0.01
    decision, reason = detect_hang(_sigstop_job(4, 2, stop_at, just_after, 99), step_times, just_after, settings)
    assert decision.hung_ranks == (2,)
    assert decision.stalled_ranks == (0, 1, 2, 3)  # the others are blocked behind it, not killed
    assert "rank 2 at step 99" in reason and "no heartbeat" in reason


def test_process_stopped_by_a_signal_is_blamed_when_nothing_else_tells_ranks_apart():
    # What the agent alone can see: every rank stalled at the same step, one of them
    # in process state "stopped".
    settings = HangSettings(k=5, floor_s=10)
    ranks = [RankProgress(rank=r, step=41, progress_at=0.0, process_stopped=(r == 0)) for r in range(3)]
    decision, reason = detect_hang(ranks, [1.0] * 20, 10.5, settings)
    assert decision.hung_ranks == (0,) and decision.stalled_ranks == (0, 1, 2)
    assert "stopped by a signal" in reason
    decision, _ = detect_hang(ranks, [1.0] * 20, 9.5, settings)
    assert decision.hung_ranks == ()


def test_rank_stuck_in_compute_is_blamed_not_the_ranks_waiting_for_it():
    settings = HangSettings(k=3, floor_s=1)
    now = 100.0
    ranks = [
        RankProgress(rank=r, step=10, progress_at=80.0, heartbeat_at=now, in_collective=(r != 1)) for r in range(4)
    ]
    decision, reason = detect_hang(ranks, [1.0] * 10, now, settings)
    assert decision.hung_ranks == (1,)
    assert "outside a collective" in reason


def test_rank_behind_the_others_is_blamed():
    settings = HangSettings(k=3, floor_s=1)
    ranks = [RankProgress(rank=r, step=10 if r != 3 else 9, progress_at=50.0) for r in range(4)]
    decision, _ = detect_hang(ranks, [1.0] * 10, 100.0, settings)
    assert decision.hung_ranks == (3,)


def test_rank_stalled_while_the_others_progress_is_blamed():
    settings = HangSettings(k=3, floor_s=1)
    ranks = [RankProgress(rank=r, step=10 if r else 4, progress_at=99.0 if r else 50.0) for r in range(3)]
    decision, reason = detect_hang(ranks, [1.0] * 10, 100.0, settings)
    assert decision.hung_ranks == (0,) and decision.stalled_ranks == (0,)
    assert "while the other ranks progress" in reason


def test_a_rank_that_crossed_the_timeout_first_is_not_blamed_while_nobody_got_past_its_step():
    # A SIGSTOP lands right after step 22: every rank stops at 22, rank 2's last line happened
    # to be 10 ms older than the stopped rank 1's. Only the next pass, with all stalled, can tell.
    settings = HangSettings(k=3, floor_s=4)
    ranks = [RankProgress(rank=r, step=22, progress_at=29.70 if r == 2 else 29.71, process_stopped=(r == 1))
             for r in range(4)]
    decision, reason = detect_hang(ranks, [0.1] * 10, 33.705, settings)
    assert decision.hung_ranks == () and decision.stalled_ranks == (2,) and reason.startswith("not yet")
    decision, reason = detect_hang(ranks, [0.1] * 10, 34.0, settings)
    assert decision.hung_ranks == (1,) and "stopped by a signal" in reason


def test_indistinguishable_stall_declares_every_stalled_rank():
    settings = HangSettings(k=3, floor_s=1)
    ranks = [RankProgress(rank=r, step=10, progress_at=50.0) for r in range(3)]
    decision, reason = detect_hang(ranks, [1.0] * 10, 100.0, settings)
    assert decision.hung_ranks == (0, 1, 2)
    assert "cannot be told apart" in reason


def test_progress_stamped_in_the_future_is_not_stale():
    settings = HangSettings(k=3, floor_s=1)
    decision, _ = detect_hang([RankProgress(rank=0, step=5, progress_at=200.0)], [1.0], 100.0, settings)
    assert decision.hung_ranks == ()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"k": 1.0}, "k"), ({"floor_s": 0}, "floor_s"), ({"floor_s": 30, "startup_timeout_s": 10}, "startup_timeout_s"),
     ({"k": float("nan")}, "k")],
)
def test_hang_settings_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        HangSettings(**kwargs)


# ---------------------------------------------------------------- straggler
def _telemetry(
    steps: int,
    world: int,
    seed: int,
    slow_rank: int | None = None,
    slowdown: float = 0.5,
    shares: list[int] | None = None,
) -> list[StepTiming]:
    """Synthetic per-rank step timings with realistic noise.

    Compute time per sample is 10 ms, times a per-rank hardware factor (+-2%),
    times lognormal jitter (~3%), with an occasional 30-80% spike (GC pause,
    page fault) on a random rank. All ranks finish a step together: each waits
    in collectives for the slowest rank, so step TIMES are equal.
    """
    rng = random.Random(seed)
    shares = shares or [8] * world
    hardware = [rng.uniform(0.98, 1.02) for _ in range(world)]
    timings = []
    for step in range(steps):
        compute = {}
        for rank in range(world):
            t = 0.010 * shares[rank] * hardware[rank] * rng.lognormvariate(0, 0.03)
            if rank == slow_rank:
                t *= 1 + slowdown
            if rng.random() < 0.01:
                t *= rng.uniform(1.3, 1.8)
            compute[rank] = t
        step_end = max(compute.values()) + 0.002
        wait = {rank: step_end - t for rank, t in compute.items()}
        timings.append(StepTiming(step=step, compute_s=compute, collective_wait_s=wait))
    return timings


def _first_flag_step(timings: list[StepTiming], settings: StragglerSettings) -> tuple[int | None, tuple[int, ...]]:
    for i in range(len(timings)):
        flagged, _ = flag_stragglers(timings[: i + 1], settings)
        if flagged:
            return i + 1, flagged
    return None, ()


@pytest.mark.parametrize("world, seed", [(8, 1), (4, 2), (3, 3), (2, 4)])
def test_slow_rank_is_flagged_within_30_steps_although_step_times_are_equal(world, seed):
    slow = world - 1
    timings = _telemetry(60, world, seed, slow_rank=slow, slowdown=0.5)
    # The premise: step time (compute + wait) is the same on every rank.
    for timing in timings:
        step_times = {r: timing.compute_s[r] + timing.collective_wait_s[r] for r in range(world)}
        assert max(step_times.values()) - min(step_times.values()) < 1e-9
    steps_needed, flagged = _first_flag_step(timings, StragglerSettings())
    assert steps_needed is not None and steps_needed <= 30
    assert flagged == (slow,)


@pytest.mark.parametrize("world, seed", [(8, 11), (4, 12), (3, 13), (2, 14), (16, 15)])
def test_healthy_run_of_500_steps_flags_no_rank(world, seed):
    settings = StragglerSettings()
    timings = _telemetry(500, world, seed)
    for end in range(1, len(timings) + 1):
        flagged, _ = flag_stragglers(timings[max(0, end - settings.window_steps):end], settings)
        assert flagged == (), f"rank(s) {flagged} flagged at step {end} of a healthy run"


def test_identical_ranks_do_not_divide_by_zero():
    scores = robust_scores({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.1}, StragglerSettings())
    assert scores == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    # One rank 1% slower than identical peers is far below the default threshold
    # because the spread is floored at 2% of the median.
    scores = robust_scores({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.101}, StragglerSettings())
    assert 0 < scores[3] < 1


def test_rebalance_moves_samples_away_from_the_slow_rank():
    shares = [8, 8, 8, 8]
    timings = _telemetry(40, 4, seed=5, slow_rank=2, slowdown=0.5, shares=shares)
    decision, reason = decide_straggler(
        timings, policy=StragglerPolicy.REBALANCE, shares=shares, micro_batch=2, settings=StragglerSettings()
    )
    assert decision.action is StragglerAction.REBALANCE
    assert decision.flagged_ranks == (2,)
    assert sum(decision.shares) == sum(shares)
    assert decision.shares[2] < 8 and all(decision.shares[r] >= 8 for r in (0, 1, 3))
    assert decision.shares[2] == min(decision.shares)
    assert "rank 2" in reason and "->" in reason


def test_after_rebalancing_the_slow_rank_is_no_longer_flagged():
    settings = StragglerSettings()
    shares = [8, 8, 8, 8]
    before = _telemetry(40, 4, seed=6, slow_rank=2, slowdown=0.5, shares=shares)
    decision, _ = decide_straggler(
        before, policy=StragglerPolicy.REBALANCE, shares=shares, micro_batch=2, settings=settings
    )
    new_shares = list(decision.shares)
    after = _telemetry(200, 4, seed=7, slow_rank=2, slowdown=0.5, shares=new_shares)
    # Step time is the slowest rank's compute: it improves once the slow rank gets fewer samples.
    slowest_before = sum(max(t.compute_s.values()) for t in before) / len(before)
    slowest_after = sum(max(t.compute_s.values()) for t in after) / len(after)
    assert slowest_after < 0.85 * slowest_before
    for end in range(settings.window_steps, len(after) + 1):
        decision, reason = decide_straggler(
            after[end - settings.window_steps:end], policy=StragglerPolicy.REBALANCE, shares=new_shares,
            micro_batch=2, settings=settings,
        )
        assert decision.action in (StragglerAction.NONE, StragglerAction.ALERT), reason


def test_rebalance_shares_sum_exactly_and_respect_the_minimum():
    rng = random.Random(9)
    for _ in range(500):
        n = rng.randint(1, 9)
        min_share = rng.randint(1, 4)
        global_batch = rng.randint(n * min_share, n * min_share + 100)
        speeds = {dp: rng.uniform(0.001, 0.1) for dp in range(n)}
        shares = rebalance_shares(speeds, global_batch, min_share)
        assert sum(shares) == global_batch
        assert min(shares) >= min_share
        faster_first = sorted(range(n), key=lambda dp: speeds[dp])
        assert all(shares[a] >= shares[b] for a, b in zip(faster_first, faster_first[1:]))


def test_rebalance_shares_are_proportional_to_throughput():
    assert rebalance_shares({0: 1.0, 1: 1.0, 2: 2.0}, 20, 1) == (8, 8, 4)
    assert rebalance_shares({0: 1.0, 1: 1.0}, 7, 1) == (4, 3)  # tie: lower dp rank first
    assert rebalance_shares({0: 1.0, 1: 100.0}, 16, 4) == (12, 4)  # slow rank keeps one micro-batch


@pytest.mark.parametrize(
    "speeds, batch, min_share",
    [({}, 8, 1), ({0: 1.0, 1: 1.0}, 3, 2), ({0: 0.0}, 4, 1), ({1: 1.0}, 4, 1), ({0: 1.0}, 4, 0)],
)
def test_rebalance_shares_rejects_bad_input(speeds, batch, min_share):
    with pytest.raises(ValueError):
        rebalance_shares(speeds, batch, min_share)


def test_evict_only_when_a_spare_exists():
    settings = StragglerSettings()
    shares = [8, 8, 8, 8]
    timings = _telemetry(40, 4, seed=8, slow_rank=1, slowdown=0.6, shares=shares)
    common = dict(policy=StragglerPolicy.EVICT, shares=shares, micro_batch=2, settings=settings)

    with_spare, reason = decide_straggler(timings, spare_available=True, **common)
    assert with_spare.action is StragglerAction.EVICT and with_spare.evict_ranks == (1,)
    assert "spare exists" in reason

    without_spare, reason = decide_straggler(timings, spare_available=False, **common)
    assert without_spare.action is StragglerAction.REBALANCE and without_spare.evict_ranks == ()
    assert "no spare" in reason


def test_evict_needs_the_slowdown_to_exceed_its_threshold():
    shares = [8, 8, 8, 8]
    timings = _telemetry(40, 4, seed=10, slow_rank=1, slowdown=0.5, shares=shares)
    decision, reason = decide_straggler(
        timings, policy=StragglerPolicy.EVICT, shares=shares, micro_batch=2, spare_available=True,
        settings=StragglerSettings(evict_slowdown=0.8),
    )
    assert decision.action is StragglerAction.REBALANCE  # slow enough to flag, not to evict
    assert decision.flagged_ranks == (1,) and decision.evict_ranks == ()
    assert "not slow enough to evict" in reason


def test_evict_still_applies_after_a_rebalance_relieved_the_rank():
    # Per-sample slowness persists even though compute times are now even.
    shares = [10, 10, 10, 2]
    timings = _telemetry(40, 4, seed=12, slow_rank=3, slowdown=4.0, shares=shares)
    decision, _ = decide_straggler(
        timings, policy=StragglerPolicy.EVICT, shares=shares, micro_batch=2, spare_available=True,
        settings=StragglerSettings(),
    )
    assert decision.action is StragglerAction.EVICT and decision.evict_ranks == (3,)


def test_alert_policy_only_alerts():
    shares = [8, 8, 8]
    timings = _telemetry(40, 3, seed=13, slow_rank=0, shares=shares)
    decision, reason = decide_straggler(
        timings, policy=StragglerPolicy.ALERT, shares=shares, micro_batch=2, spare_available=True,
        settings=StragglerSettings(),
    )
    assert decision.action is StragglerAction.ALERT and decision.flagged_ranks == (0,)
    assert decision.shares == () and decision.evict_ranks == ()
    assert reason.startswith("alert only (policy is alert)") and "rank 0" in reason


def test_pipeline_replica_is_as_slow_as_its_slowest_stage():
    # dp=2, pp=2: ranks 0,1 are replica 0; ranks 2,3 replica 1. Rank 3 is slow.
    rng = random.Random(14)
    shares = [8, 8]
    timings = []
    for step in range(30):
        compute = {r: 0.08 * rng.lognormvariate(0, 0.02) for r in range(4)}
        compute[3] *= 1.5
        timings.append(StepTiming(step=step, compute_s=compute))
    decision, _ = decide_straggler(
        timings, policy=StragglerPolicy.REBALANCE, shares=shares, micro_batch=2, pp=2, settings=StragglerSettings()
    )
    assert decision.flagged_ranks == (3,)
    assert decision.action is StragglerAction.REBALANCE
    assert decision.shares[1] < decision.shares[0] and sum(decision.shares) == 16


def test_pipeline_stages_are_not_compared_with_each_other():
    # dp=3, pp=3; the last stage holds the LM head: twice the compute of the others, by design.
    rng = random.Random(15)
    timings = []
    for step in range(100):
        compute = {r: (0.16 if r % 3 == 2 else 0.08) * rng.lognormvariate(0, 0.03) for r in range(9)}
        timings.append(StepTiming(step=step, compute_s=compute))
    settings = StragglerSettings()
    assert flag_stragglers(timings[-20:], settings, pp=1)[0] == (2, 5, 8)  # what a stage-blind check would do
    for end in range(settings.window_steps, len(timings) + 1):
        flagged, _ = flag_stragglers(timings[end - settings.window_steps:end], settings, pp=3)
        assert flagged == ()
    decision, reason = decide_straggler(
        timings, policy=StragglerPolicy.EVICT, shares=[4, 4, 4], micro_batch=1, pp=3, spare_available=True,
        settings=settings,
    )
    assert decision.action is StragglerAction.NONE, reason


def test_no_timings_means_no_decision():
    decision, reason = decide_straggler(
        [], policy=StragglerPolicy.REBALANCE, shares=[4, 4], micro_batch=1, settings=StragglerSettings()
    )
    assert decision.action is StragglerAction.NONE and reason == "no step timings yet"


@pytest.mark.parametrize(
    "kwargs, field",
    [({"z_threshold": 0}, "z_threshold"), ({"mad_floor": 0}, "mad_floor"), ({"window_steps": 0}, "window_steps"),
     ({"window_steps": 2.5}, "window_steps"), ({"flag_fraction": 1.5}, "flag_fraction"),
     ({"min_slowdown": -0.1}, "min_slowdown"), ({"evict_slowdown": 0}, "evict_slowdown"),
     ({"min_step_cost": 1.0}, "min_step_cost"), ({"min_step_cost": -0.01}, "min_step_cost")],
)
def test_straggler_settings_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        StragglerSettings(**kwargs)


def test_a_slower_compute_that_costs_a_sliver_of_a_waiting_step_is_no_straggler():
    """Seen beside a busy process: the two ranks of the replica whose pipeline link was slow
    computed 14-15 ms against 11 ms on the other replica (+30%), in 620 ms steps spent mostly
    waiting on that link; a rebalance for 3 ms a step wins nothing back."""
    settings = StragglerSettings(window_steps=12, min_slowdown=0.2)

    def window(step_time_s: float) -> list[StepTiming]:
        return [StepTiming(step=s, compute_s={0: 0.0145, 1: 0.011, 2: 0.0112, 3: 0.0111},
                           step_time_s=step_time_s) for s in range(80)]

    flagged, _ = flag_stragglers(window(0.62), settings)
    assert flagged == ()
    # the same compute in steps it dominates is a straggler (3.4 ms is over 2% of a 40 ms step)
    flagged, _ = flag_stragglers(window(0.04), settings)
    assert flagged == (0,)
    flagged, _ = flag_stragglers(window(0.62), StragglerSettings(window_steps=12, min_slowdown=0.2,
                                                                  min_step_cost=0.0))
    assert flagged == (0,)


# ------------------------------------------------------------- window in time, eviction size
def _pair(steps: int, *, slow_from: int, slow_to: int, factor: float, step_time_s: float) -> list[StepTiming]:
    """Two ranks of 0.8 x step time compute; rank 1 is ``factor`` slower in steps [slow_from, slow_to)."""
    out = []
    for step in range(steps):
        slow = factor if slow_from <= step < slow_to else 1.0
        out.append(StepTiming(step=step, compute_s={0: 0.8 * step_time_s, 1: 0.8 * step_time_s * slow},
                              step_time_s=step_time_s * slow))
    return out


def test_decision_window_stretches_short_steps_to_min_window_s():
    from controller.detection import MAX_WINDOW_STEPS, decision_window

    settings = StragglerSettings(window_steps=12, min_window_s=2.0)
    slow_steps = _pair(100, slow_from=0, slow_to=0, factor=1.0, step_time_s=0.25)
    recent, full = decision_window(slow_steps, settings)
    assert len(recent) == 12 and full  # 12 x 0.25 s = 3 s: the step count decides
    fast = _pair(100, slow_from=0, slow_to=0, factor=1.0, step_time_s=0.05)
    recent, full = decision_window(fast, settings)
    assert len(recent) == 40 and full  # 40 x 0.05 s = 2 s
    recent, full = decision_window(fast[:30], settings)
    assert len(recent) == 30 and not full  # 1.5 s of steps: not enough evidence yet
    tiny = _pair(100, slow_from=0, slow_to=0, factor=1.0, step_time_s=0.001)
    recent, full = decision_window(tiny, settings)
    assert len(recent) == MAX_WINDOW_STEPS and full  # capped: the agents relay 64 steps per rank
    untimed = [StepTiming(step=t.step, compute_s=t.compute_s) for t in fast]
    recent, full = decision_window(untimed, settings)
    assert len(recent) == 12 and full  # step times unknown: the step count alone


def test_a_one_second_hiccup_of_short_steps_is_not_a_straggler_but_a_lasting_slowdown_is():
    settings = StragglerSettings(window_steps=12, min_window_s=2.0)
    # 50 ms steps; rank 1 50% slower for 16 steps (~1.2 s: a host busy with something else)
    hiccup = _pair(200, slow_from=100, slow_to=116, factor=1.5, step_time_s=0.05)
    for end in range(1, len(hiccup) + 1):
        assert flag_stragglers(hiccup[:end], settings)[0] == (), f"flagged at step {end}"
    # the same slowdown for good: flagged once the slow steps fill 80% of a 2 s window
    lasting = _pair(200, slow_from=100, slow_to=200, factor=1.5, step_time_s=0.05)
    first = next(end for end in range(1, 201) if flag_stragglers(lasting[:end], settings)[0] == (1,))
    assert 100 + 20 <= first <= 100 + 35, first
    # the time floor alone (step count 12 without it) would have flagged the hiccup
    assert any(flag_stragglers(hiccup[:end], StragglerSettings(window_steps=12, min_window_s=0))[0] == (1,)
               for end in range(1, 201))


def test_evict_judges_the_slowdown_by_its_median_not_by_every_step():
    # rank 1 is 1.6x slower per sample, but a busy host made 3 of its last 12 steps look only
    # 1.2x slower (its peer was slowed too): still a clear case for a spare, not a rebalance
    shares = [8, 8]
    timings = []
    for step in range(12):
        peer = 0.20 * (1.33 if step in (2, 6, 9) else 1.0)
        timings.append(StepTiming(step=step, compute_s={0: peer, 1: 0.32}, step_time_s=0.4))
    decision, reason = decide_straggler(timings, policy=StragglerPolicy.EVICT, shares=shares, micro_batch=2,
                                        spare_available=True, settings=StragglerSettings(window_steps=12))
    assert decision.action is StragglerAction.EVICT and decision.evict_ranks == (1,), reason
    assert decision.flagged_ranks == (1,)
    # a slowdown that is large only in a few steps is not persistent: no eviction
    spiky = [StepTiming(step=s, compute_s={0: 0.2, 1: 0.4 if s % 3 == 0 else 0.2}, step_time_s=0.4)
             for s in range(12)]
    decision, reason = decide_straggler(spiky, policy=StragglerPolicy.EVICT, shares=shares, micro_batch=2,
                                        spare_available=True, settings=StragglerSettings(window_steps=12))
    assert decision.action is StragglerAction.NONE and decision.evict_ranks == (), reason


def test_min_window_s_is_validated():
    with pytest.raises(ValueError, match="^min_window_s:"):
        StragglerSettings(min_window_s=-1)
