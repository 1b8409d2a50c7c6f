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
