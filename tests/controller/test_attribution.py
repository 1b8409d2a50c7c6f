"""Communication vs compute attribution (controller/attribution.py, pure)."""

from __future__ import annotations

import pytest

from controller.attribution import AttributionSettings, RankComm, attribute, window_from_steps, window_from_summaries

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
    assert decision.compute_ranks == () and decision.link_pairs == ((1, 2),)
    assert "link rank 1 -> rank 2 slow" in reason and "not compute" in reason
    link, = decision.links
    assert link.wait_s == 0.15 and link.reference_s == pytest.approx(0.0054)  # the median of the other edges
    assert link.sender_compute_s == 0.201


def test_a_delay_that_propagates_down_the_pipeline_is_named_once_at_its_origin():
    decision, _ = attribute(pp4_dp2(waits={(1, 2): 0.15, (2, 3): 0.14}), S)
    assert decision.link_pairs == ((1, 2),)


def test_a_slow_rank_explains_its_neighbours_waits():
    decision, reason = attribute(pp4_dp2(compute={1: 0.35}, waits={(1, 2): 0.15, (1, 0): 0.12}), S)
    assert decision.compute_ranks == (1,) and decision.link_pairs == ()
    assert "rank 1 compute slow" in reason and "explains the waits of [0, 2]" in reason


def test_balanced_job_attributes_nothing():
    decision, reason = attribute(pp4_dp2(), S)
    assert decision.compute_ranks == () and decision.link_pairs == () and reason == "no slow compute or communication"


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
    assert decision.link_pairs == ((2, 6),) and decision.compute_ranks == (), reason
    # without the layout the structural bubble of stage 0 hides it
    assert attribute(window, S)[0].link_pairs != ((2, 6),)


def pp2_dp2(compute=None, waits=None):
    """4 ranks, pipelines 0->1 and 2->3 (rank = dp * 2 + stage)."""
    compute, waits = compute or {}, waits or {}
    base = {(0, 1): 0.05, (2, 3): 0.055, (1, 0): 0.30, (3, 2): 0.29}
    out = {}
    for r in range(4):
        peer = r + 1 if r % 2 == 0 else r - 1
        out[r] = RankComm(compute_s=compute.get(r, 0.2 + 0.002 * r), receive_wait_s={peer: waits.get((peer, r), base[(peer, r)])})
    return out, {r: r % 2 for r in range(4)}


def test_dp2_replicas_are_compared_with_each_other_and_a_delayed_sender_is_a_link():
    window, stage_of = pp2_dp2(waits={(0, 1): 0.45})
    decision, reason = attribute(window, S, stage_of)
    assert decision.link_pairs == ((0, 1),) and decision.compute_ranks == () and decision.peers == (), reason
    assert "link rank 0 -> rank 1 slow: rank 1 waits 0.450s/step" in reason and "vs 0.055s" in reason


def test_a_little_slower_compute_does_not_explain_a_much_longer_wait():
    # under load the delayed sender's compute is 30% slower too: 0.06 s cannot explain 0.4 s of waiting
    window, stage_of = pp2_dp2(compute={0: 0.26}, waits={(0, 1): 0.45})
    decision, reason = attribute(window, S, stage_of)
    assert decision.compute_ranks == (0,) and decision.link_pairs == ((0, 1),), reason
    # a sender slow enough to account for the wait is its compute, not the link
    window, stage_of = pp2_dp2(compute={0: 0.55}, waits={(0, 1): 0.40})
    decision, reason = attribute(window, S, stage_of)
    assert decision.compute_ranks == (0,) and decision.links == (), reason


def test_a_sender_slow_on_every_outgoing_edge_is_named_as_a_peer():
    decision, reason = attribute(pp4_dp2(waits={(5, 6): 0.15, (5, 4): 0.2}), S)
    assert decision.peers == (5,) and set(decision.link_pairs) == {(5, 4), (5, 6)}, reason
    assert "peer rank 5 slow to send" in reason


def test_dp1_has_nothing_to_compare_with():
    window = {0: RankComm(compute_s=0.2, receive_wait_s={1: 0.9}), 1: RankComm(compute_s=0.2, receive_wait_s={0: 0.05})}
    assert attribute(window, S, {0: 0, 1: 1})[0] == attribute({}, S)[0]


def test_window_from_the_agents_summaries_scales_to_even_shares():
    summaries = {0: {"n": 20, "compute": 0.3, "kind": {}, "peer": {"pipeline receive|1": 0.2, "pipeline send|1": 9.0}},
                 1: {"n": 20, "compute": 0, "peer": {}}, 2: {"compute": True}}
    window = window_from_summaries(summaries, scale={0: 0.5})
    assert set(window) == {0} and window[0].compute_s == 0.15 and window[0].receive_wait_s == {1: 0.1}


def test_explain_fraction_is_validated():
    with pytest.raises(ValueError, match="explain_fraction"):
        AttributionSettings(explain_fraction=0)


def test_of_a_pairs_two_slow_directions_the_larger_is_the_origin():
    # rank 0's delayed activations make rank 1 late with its gradients too
    window, stage_of = pp2_dp2(waits={(0, 1): 0.45, (1, 0): 0.45})
    window[0] = RankComm(compute_s=0.2, receive_wait_s={1: 0.40})
    decision, reason = attribute(window, S, stage_of)
    assert decision.link_pairs == ((0, 1),), reason


def test_a_compute_time_a_little_above_its_peer_is_not_slow():
    window, stage_of = pp2_dp2(compute={0: 0.23}, waits={(0, 1): 0.45})  # 13% above rank 2, z > 3.5
    assert attribute(window, AttributionSettings(min_spread=0.01, min_slowdown=0.05), stage_of)[0].compute_ranks == (0,)
    decision, _ = attribute(window, AttributionSettings(min_spread=0.01, min_slowdown=0.2), stage_of)
    assert decision.compute_ranks == () and decision.link_pairs == ((0, 1),)
