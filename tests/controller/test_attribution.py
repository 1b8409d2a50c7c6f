"""Communication vs compute attribution (controller/attribution.py, pure)."""

from __future__ import annotations

import pytest

from controller.attribution import AttributionSettings, RankComm, attribute, window_from_steps

S = AttributionSettings()


def pp4_dp2(compute=None, waits=None):
    """8 ranks, two pipelines 0->1->2->3 and 4->5->6->7; receive waits of about 5 ms."""
    compute = compute or {}
    waits = waits or {}
    out = {}
    for r in range(8):
        stage = r % 4
        peers = {}
        if stage > 0:
            peers[r - 1] = waits.get((r - 1, r), 0.005 + 0.0001 * r)
        if stage < 3:
            peers[r + 1] = waits.get((r + 1, r), 0.005 + 0.0001 * r)
        out[r] = RankComm(compute_s=compute.get(r, 0.20 + 0.001 * r), receive_wait_s=peers)
    return out


def test_slow_sends_with_normal_compute_point_at_the_link_not_the_rank():
    decision, reason = attribute(pp4_dp2(waits={(1, 2): 0.15}), S)
    assert decision.compute_ranks == () and decision.links == ((1, 2),)
    assert "link 1->2" in reason and "not compute" in reason


def test_a_delay_that_propagates_down_the_pipeline_is_named_once_at_its_origin():
    decision, _ = attribute(pp4_dp2(waits={(1, 2): 0.15, (2, 3): 0.14}), S)
    assert decision.links == ((1, 2),)


def test_a_slow_rank_explains_its_neighbours_waits():
    decision, reason = attribute(pp4_dp2(compute={1: 0.35}, waits={(1, 2): 0.15, (1, 0): 0.12}), S)
    assert decision.compute_ranks == (1,) and decision.links == ()
    assert "compute slow on ranks [1]" in reason


def test_balanced_job_attributes_nothing():
    decision, reason = attribute(pp4_dp2(), S)
    assert decision.compute_ranks == () and decision.links == () and reason == "no slow compute or communication"


def test_window_from_step_lines_takes_medians_per_peer():
    lines = {2: [{"compute_time": 0.2, "comm": {"peer": {"pipeline receive|1": w, "pipeline receive|3": 0.01},
                                                "kind": {}}} for w in (0.1, 0.3, 0.2)],
             3: [{"loss": 1.0}]}
    window = window_from_steps(lines)
    assert set(window) == {2} and window[2].receive_wait_s == {1: 0.2, 3: 0.01}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="z"):
        AttributionSettings(z=0)
    with pytest.raises(ValueError, match="min_excess_s"):
        AttributionSettings(min_excess_s=-1)


def test_with_the_layout_a_wait_is_compared_with_the_same_stage_pair_of_other_replicas():
    # pp2 x dp4: stage 0 = ranks 0..3 wait ~1 s for gradients (1F1B bubble), stage 1 = ranks 4..7
    # wait ~0.1 s for activations; replica 2's link 2->6 is slow (0.5 s), within what stage 0 waits
    window = {}
    for d in range(4):
        first, last = d, d + 4
        window[first] = RankComm(compute_s=0.2 + 0.001 * d, receive_wait_s={last: 1.0 + 0.01 * d})
        window[last] = RankComm(compute_s=0.2 + 0.001 * d, receive_wait_s={first: 0.5 if d == 2 else 0.1 + 0.001 * d})
    stage_of = {r: 0 if r < 4 else 1 for r in range(8)}
    decision, reason = attribute(window, S, stage_of)
    assert decision.links == ((2, 6),) and decision.compute_ranks == (), reason
    # without the layout the structural bubble of stage 0 hides it
    assert attribute(window, S)[0].links != ((2, 6),)
