"""Quarantine decisions (controller/quarantine.py): pure, driven with synthetic times."""

from __future__ import annotations

import argparse

import pytest

from cli.controller import add_controller_args, quarantine_settings_from_args
from controller.quarantine import (
    AUTO_CORDON_REASON,
    FAILED_SLOTS_KEY,
    NODE_WIDE,
    QUARANTINE_KEY,
    QuarantineSettings,
    SlotRecord,
    cooldown_s,
    excluded_slots,
    plan_extra,
    prune,
    record_failures,
    records_from,
    slot_state,
)

S = QuarantineSettings(base_cooldown_s=10, max_cooldown_s=60, healthy_reset_s=100, window_s=200,
                       slot_cordon_failures=3, node_cordon_failures=4)


def fail(records, now, *slots, lost=(), **kw):
    return record_failures(records, slots=slots, lost_nodes=lost, now=now, settings=S, **kw)


# ------------------------------------------------------------------ settings
def test_defaults_are_valid_and_documented_in_seconds():
    d = QuarantineSettings()
    assert d.base_cooldown_s > 0 and d.max_cooldown_s >= d.base_cooldown_s
    assert d.slot_cordon_failures >= 2 and d.node_cordon_failures >= d.slot_cordon_failures


@pytest.mark.parametrize("kwargs, field", [
    ({"base_cooldown_s": 0}, "quarantine.base_cooldown_s"),
    ({"base_cooldown_s": float("nan")}, "quarantine.base_cooldown_s"),
    ({"window_s": -1}, "quarantine.window_s"),
    ({"max_cooldown_s": 5, "base_cooldown_s": 10}, "quarantine.max_cooldown_s"),
    ({"slot_cordon_failures": 0}, "quarantine.slot_cordon_failures"),
    ({"node_cordon_failures": 2.5}, "quarantine.node_cordon_failures"),
    ({"healthy_reset_s": True}, "quarantine.healthy_reset_s"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuarantineSettings(**kwargs)


def test_settings_from_the_controller_flags_name_the_flag():
    parser = argparse.ArgumentParser()
    add_controller_args(parser)
    s = quarantine_settings_from_args(parser.parse_args(["--quarantine-base-s=2.5", "--slot-cordon-failures=7"]))
    assert s.base_cooldown_s == 2.5 and s.slot_cordon_failures == 7 and s.window_s == QuarantineSettings().window_s
    with pytest.raises(ValueError, match="--quarantine-base-s"):
        quarantine_settings_from_args(parser.parse_args(["--quarantine-base-s=-1"]))
    with pytest.raises(ValueError, match="--node-cordon-failures"):
        quarantine_settings_from_args(parser.parse_args(["--node-cordon-failures=0"]))


# ------------------------------------------------------------------ cool-down
def test_cooldown_doubles_per_failure_in_a_row_and_is_capped():
    assert [cooldown_s(n, S) for n in range(0, 6)] == [0, 10, 20, 40, 60, 60]
    assert cooldown_s(10_000, S) == 60  # no overflow for a huge count


def test_a_failed_slot_is_quarantined_then_usable_again_after_its_cooldown():
    records, cordons = fail([], 1000.0, ("n1", 1))
    assert cordons == []
    (r,) = records
    assert (r.node, r.slot, r.count, r.until, r.failures) == ("n1", 1, 1, 1010.0, (1000.0,))
    assert excluded_slots(records, now=1000.0) == {("n1", 1): "n1/1 quarantined for 10 s more (failure 1 in a row)"}
    assert excluded_slots(records, now=1009.9).keys() == {("n1", 1)}
    assert excluded_slots(records, now=1010.0) == {}  # a candidate again: growth picks it up
    ok, why = slot_state(r, now=1010.0)
    assert ok and "cool-down over" in why


def test_repeated_failures_grow_the_cooldown_and_a_healthy_period_resets_it():
    records, _ = fail([], 1000.0, ("n1", 1))
    records, _ = fail(records, 1015.0, ("n1", 1))  # used again after 10 s, failed 5 s later
    assert records[0].count == 2 and records[0].until == 1015.0 + 20
    records, _ = fail(records, 1015.0 + 99, ("n1", 1))  # within healthy_reset_s of the last: in a row
    assert records[0].count == 3
    # healthy for healthy_reset_s: back to the base cool-down (a window of 200 s still holds 1 old failure)
    s = QuarantineSettings(base_cooldown_s=10, max_cooldown_s=60, healthy_reset_s=100, window_s=200,
                           slot_cordon_failures=10, node_cordon_failures=10)
    records, _ = record_failures([SlotRecord(node="n1", slot=1, failures=(1000.0,), count=4, until=1060.0)],
                                 slots=[("n1", 1)], now=1100.0, settings=s)
    assert (records[0].count, records[0].until, records[0].failures) == (1, 1110.0, (1000.0, 1100.0))


def test_a_slot_that_keeps_failing_is_cordoned_for_the_job_once():
    records, c1 = fail([], 0.0, ("n1", 1))
    records, c2 = fail(records, 20.0, ("n1", 1))
    assert c1 == c2 == []
    records, c3 = fail(records, 50.0, ("n1", 1))
    assert [(c.node, c.slot) for c in c3] == [("n1", 1)] and "3 failures within 200 s" in c3[0].reason
    r = records[0]
    assert r.cordoned and excluded_slots(records, now=10_000.0).keys() == {("n1", 1)}  # cool-down over, still out
    assert "cordoned for the job" in excluded_slots(records, now=10_000.0)[("n1", 1)]
    records, c4 = fail(records, 60.0, ("n1", 1))
    assert [c for c in c4 if c.slot is not None] == []  # decided once: no second event for the same slot


def test_failures_spread_wider_than_the_window_do_not_cordon():
    records: list = []
    for t in (0.0, 150.0, 300.0, 450.0):  # every failure: a healthy gap > healthy_reset_s too
        records, cordons = fail(records, t, ("n1", 1))
        assert cordons == []
    assert records[0].failures == (300.0, 450.0) and records[0].count == 1 and not records[0].cordoned


def test_a_node_that_keeps_failing_on_any_slot_is_cordoned_once():
    records, cordons = fail([], 0.0, ("n1", 0), ("n1", 1))
    assert cordons == []
    records, cordons = fail(records, 30.0, ("n1", 0), ("n1", 2), ("n2", 0))
    assert cordons == [c for c in cordons if c.slot is None] and [c.node for c in cordons] == ["n1"]
    assert "4 failures" in cordons[0].reason and "node_cordon_failures=4" in cordons[0].reason
    # its history starts afresh: an operator's uncordon is not undone by the next single failure
    assert all(r.failures == () for r in records if r.node == "n1")
    # what is quarantined stays so (n1/1's cool-down ended at 10 s)
    assert excluded_slots(records, now=31.0).keys() == {("n1", 0), ("n1", 2), ("n2", 0)}
    records, cordons = fail(records, 40.0, ("n1", 0))
    assert cordons == []
    # already cordoned (by an operator, or an earlier decision): not decided again
    records, cordons = fail(records, 41.0, ("n1", 1), ("n1", 2), ("n1", 3), cordoned_nodes={"n1"})
    assert [c for c in cordons if c.slot is None] == []


def test_a_flapping_node_is_cordoned_by_its_losses_although_each_return_makes_it_usable():
    records: list = []
    for i, t in enumerate((0.0, 10.0, 20.0, 30.0)):
        records, cordons = fail(records, t, lost=["n3"], node_started={"n3": t - 5})
        # a lost node is never quarantined: back, it is usable at once
        assert excluded_slots(records, now=t + 1, node_started={"n3": t + 0.5}) == {}
        assert (cordons != []) == (i == 3)
    assert cordons[0].node == "n3" and cordons[0].slot is None


def test_a_node_that_rejoins_is_usable_at_once():
    records, _ = fail([], 100.0, ("n1", 0), ("n2", 0))
    assert excluded_slots(records, now=101.0, node_started={"n1": 50.0}).keys() == {("n1", 0), ("n2", 0)}
    # n1's agent registered after the failure: its quarantine is void
    assert excluded_slots(records, now=101.0, node_started={"n1": 100.5}).keys() == {("n2", 0)}
    ok, why = slot_state(records[0], now=101.0, node_started={"n1": 100.5})
    assert ok and "restarted" in why
    assert [r.node for r in prune(records, now=101.0, settings=S, node_started={"n1": 100.5})] == ["n2"]
    # and its old failures no longer count towards a cordon
    records, _ = fail(records, 102.0, ("n1", 0), node_started={"n1": 100.5})
    assert [r.failures for r in records if r.node == "n1"] == [(102.0,)]


def test_prune_forgets_what_no_longer_matters_and_keeps_cordons():
    records = [SlotRecord(node="a", slot=0, failures=(0.0,), count=1, until=10.0),
               SlotRecord(node="b", slot=0, failures=(0.0,), count=1, until=500.0),
               SlotRecord(node="c", slot=0, failures=(0.0,), count=3, until=10.0, cordoned="flaky"),
               SlotRecord(node="d", slot=0, failures=(150.0,), count=1, until=160.0)]
    assert [r.node for r in prune(records, now=300.0, settings=S)] == ["b", "c", "d"]


def test_plan_extra_round_trips_and_lists_the_excluded_slots():
    records, _ = fail([], 0.0, ("n1", 1), ("n2", 0))
    records = records + [SlotRecord(node="n3", slot=2, failures=(0.0,), count=1, until=1.0)]
    extra = plan_extra(records, now=5.0, settings=S)
    assert extra[FAILED_SLOTS_KEY] == [["n1", 1], ["n2", 0]]
    assert records_from(extra, settings=S) == sorted(records, key=lambda r: (r.node, r.slot))


def test_records_from_garbage_and_from_an_older_plan():
    junk = {QUARANTINE_KEY: [{"node": "n1", "slot": 1, "failures": [3.0, "x", float("inf")], "count": -2,
                              "until": "soon", "cordoned": 5},
                             {"node": "", "slot": 1}, {"node": "n1", "slot": True}, ["n1", 1], None]}
    assert records_from(junk, settings=S) == [SlotRecord(node="n1", slot=1, failures=(3.0,))]
    # a plan written before quarantine existed: its exiled slots get one base cool-down from planned_at
    old = {FAILED_SLOTS_KEY: [["n1", 1], ["bad"], ["n1", "x"]], "planned_at": 100.0}
    (r,) = records_from(old, settings=S)
    assert (r.node, r.slot, r.count, r.until) == ("n1", 1, 1, 110.0)
    assert records_from({}, settings=S) == []


def test_node_wide_records_never_exclude_a_slot():
    records, _ = fail([], 0.0, lost=["n1"])
    assert records[0].slot == NODE_WIDE and excluded_slots(records, now=0.0) == {}


def test_a_node_cordoned_for_failing_is_not_said_to_be_cordoned_by_an_operator():
    from controller.decisions import node_state

    reason = f"{AUTO_CORDON_REASON}: 5 failures of job workers or of the node within 3600 s"
    assert node_state(registered=True, cordon_reason=reason) == ("CORDONED", reason)
    assert node_state(registered=True, cordon_reason="cordon") == ("CORDONED", "cordon by operator")
