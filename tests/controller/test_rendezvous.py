"""The rendezvous deadline (controller/rendezvous.py) and its wiring in the health loop: a plan
generation whose rendezvous some rank never reaches is abandoned after a deadline derived from
the job's measured start-up and step times, and re-planned around the missing rank."""

from __future__ import annotations

import asyncio
import json

import pytest

from controller.health_loop import HealthLoop, HealthSettings, rendezvous_state, startup_samples
from controller.rendezvous import RendezvousSettings, RendezvousState, decide_rendezvous, rendezvous_deadline
from protos.records import JobStatusRecord
from tests.controller.test_health_loop import (JOB, KEYS, FakeRecovery, controller_flags, controller_with_job, entry,
                                              publish, spec, steps_of)
from cli.controller import health_settings_from_args

SETTINGS = RendezvousSettings(floor_s=5.0, cap_s=60.0, startup_factor=3.0, step_k=5.0)


def state(**overrides) -> RendezvousState:
    base = dict(generation=2, ranks=(0, 1, 2), arrived_at={0: 100.0, 2: 100.2}, seen_at=99.5,
                startup_s=(4.0, 3.0), step_times_s=(0.2, 0.2, 0.4))
    return RendezvousState(**{**base, **overrides})


# ------------------------------------------------------------------ the deadline
def test_deadline_is_factor_times_slowest_startup_plus_k_median_steps_clamped():
    deadline, why = rendezvous_deadline([4.0, 3.0], [0.2, 0.2, 0.4], SETTINGS)
    assert deadline == pytest.approx(3 * 4.0 + 5 * 0.2)
    assert "slowest start-up 4.0s" in why and "median step 0.200s" in why
    assert rendezvous_deadline([0.5], [0.01], SETTINGS)[0] == 5.0  # the floor
    assert "(floor)" in rendezvous_deadline([0.5], [0.01], SETTINGS)[1]
    assert rendezvous_deadline([40.0], [0.1], SETTINGS)[0] == 60.0  # the cap
    assert rendezvous_deadline([4.0], [], SETTINGS)[0] == 12.0  # no step time yet: start-up alone


def test_deadline_is_the_cap_while_nothing_is_measured_and_ignores_garbage():
    deadline, why = rendezvous_deadline([], [0.2], SETTINGS)
    assert deadline == 60.0 and "no worker start-up measured" in why
    assert rendezvous_deadline([float("nan"), -1.0, 0.0], [], SETTINGS)[0] == 60.0
    assert rendezvous_deadline([2.0, float("inf")], [float("nan")], SETTINGS)[0] == 6.0


@pytest.mark.parametrize("bad", [dict(floor_s=0), dict(cap_s=4.0), dict(startup_factor=0.5),
                                 dict(step_k=-1), dict(floor_s=float("nan"))])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError, match=f"^{next(iter(bad))}: "):
        RendezvousSettings(**{**dict(floor_s=5.0, cap_s=60.0), **bad})


# ------------------------------------------------------------------ the decision
def test_a_rank_that_never_arrives_is_given_up_on_after_the_deadline_from_the_first_arrival():
    deadline = 3 * 4.0 + 5 * 0.2  # 13 s from the first arrival at 100.0
    decision, why = decide_rendezvous(state(), 100.0 + deadline - 0.1, SETTINGS)
    assert decision.missing_ranks == () and decision.deadline_s == pytest.approx(deadline)
    assert why.startswith("waiting for ranks [1]")
    decision, why = decide_rendezvous(state(), 100.0 + deadline + 0.1, SETTINGS)
    assert decision.missing_ranks == (1,)
    assert decision.waited_s == pytest.approx(deadline + 0.1)
    assert "ranks [1] did not reach the rendezvous of generation 2 within 13.0s" in why


def test_no_decision_when_everyone_arrived_nobody_arrived_or_at_the_launch():
    assert decide_rendezvous(state(arrived_at={0: 1.0, 1: 1.0, 2: 1.0}), 1e6, SETTINGS)[0].missing_ranks == ()
    decision, why = decide_rendezvous(state(arrived_at={}), 1e6, SETTINGS)
    assert decision.missing_ranks == () and "no rank reached" in why
    decision, why = decide_rendezvous(state(generation=1), 1e6, SETTINGS)
    assert decision.missing_ranks == () and "launch" in why


def test_the_deadline_never_starts_before_the_controller_saw_the_generation():
    # a new leader saw generation 2 at 200: arrivals at 100 are not held against the missing rank
    late = state(seen_at=200.0)
    assert decide_rendezvous(late, 210.0, SETTINGS)[0].missing_ranks == ()
    assert decide_rendezvous(late, 213.1, SETTINGS)[0].missing_ranks == (1,)


def test_several_missing_ranks_are_all_named():
    decision, _ = decide_rendezvous(state(ranks=(0, 1, 2, 3)), 1e6, SETTINGS)
    assert decision.missing_ranks == (1, 3)


# ------------------------------------------------------------------ gathering from telemetry
def test_rendezvous_state_reads_arrivals_steps_and_startups_from_rank_telemetry():
    s = spec()
    _, plan = controller_with_job(s)
    g2 = plan.__class__.from_dict({**plan.to_dict(), "generation": 2})
    ranks = {
        0: {**entry(generation=2, steps=steps_of(1, 5, 0.1, step_time=0.3)), "arrived": 2, "arrived_at": 50.0,
            "startup_s": 4.5, "pid": 10},
        1: {**entry(generation=2, steps=steps_of(1, 5, 0.1)), "arrived": 1, "arrived_at": 1.0, "startup_s": 6.0,
            "pid": 11},  # arrived at generation 1 only
        2: {**entry(generation=2, steps=steps_of(6, 6, 0.1, generation=2)), "pid": 12},  # stepped at 2: arrived
        # rank 3 reports nothing (its worker never started, or its agent never published)
    }
    st = rendezvous_state(g2, ranks, seen_at=40.0, startups=[4.5, 6.0])
    assert st.generation == 2 and st.ranks == (0, 1, 2, 3)
    assert st.arrived_at == {0: 50.0, 2: 40.0}
    assert sorted(st.step_times_s) == sorted([0.3] * 5 + [0.2] * 6)  # every generation's steps
    assert startup_samples(ranks) == {10: 4.5, 11: 6.0}
    decision, _ = decide_rendezvous(st, 50.0 + 3 * 6.0 + 5 * 0.2 + 0.1, SETTINGS)
    assert decision.missing_ranks == (1, 3)


# ------------------------------------------------------------------ one pass of the loop
class ReplanRecovery(FakeRecovery):
    async def request_replan(self, job_id, cause, *, lost_ranks=(), lost_nodes=(), detected_at=None,
                             generation=None):
        self.calls.append(("replan", job_id, tuple(lost_ranks), cause, generation))
        return True, "written"


def test_loop_replans_around_a_rank_that_never_arrives_with_an_event_naming_it():
    c, plan = controller_with_job(spec())
    c.recovery = ReplanRecovery()
    g2 = plan.__class__.from_dict({**plan.to_dict(), "generation": 2})
    c.put(KEYS.job_plan(JOB), g2.to_json())
    c.put(KEYS.job_status(JOB), JobStatusRecord(phase="RECOVERING", generation=2).to_json())
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(rendezvous=SETTINGS))
    old = steps_of(1, 10, 0.1, step_time=0.2)
    ranks = {r: {**entry(generation=2, progress_at=0.0, steps=old), "arrived": 2, "arrived_at": 100.0,
                 "startup_s": 2.0, "pid": 10 + r} for r in (0, 2, 3)}
    ranks[1] = {**entry(generation=2, progress_at=0.0, steps=old), "arrived": 1, "arrived_at": 1.0, "pid": 11}
    publish(c, g2, ranks)
    asyncio.run(loop.tick(99.0))  # generation 2 first seen
    deadline = 3 * 2.0 + 5 * 0.2  # 7 s
    asyncio.run(loop.tick(100.0 + deadline - 0.2))
    assert c.recovery.calls == []
    asyncio.run(loop.tick(100.0 + deadline + 0.3))
    [call] = c.recovery.calls
    kind, job, lost, cause, generation = call
    a = g2.worker(1)
    assert (kind, job, lost, generation) == ("replan", JOB, (1,), 2)
    assert cause == (f"rendezvous-timeout: rank 1 on {a.node} slot {a.slot} did not reach the rendezvous of "
                     f"generation 2 within 7.0 s")
    [event] = [json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.job_events(JOB))]
    assert event["kind"] == "rendezvous-timeout"
    assert {k: event["data"][k] for k in ("rank", "node", "slot", "generation", "deadline_s")} == \
        {"rank": 1, "node": a.node, "slot": a.slot, "generation": 2, "deadline_s": 7.0}
    assert "slowest start-up 2.0s" in event["data"]["decision"]
    # the next pass (the plan not moved on in this mirror) asks again, guarded by the generation,
    # and writes no second event
    asyncio.run(loop.tick(100.0 + deadline + 1.0))
    assert [c[4] for c in c.recovery.calls] == [2, 2]
    assert len([k for k in c.etcd.puts if k.startswith(KEYS.job_events(JOB))]) == 1


def test_loop_remembers_startups_of_workers_that_are_gone():
    c, plan = controller_with_job(spec())
    c.recovery = ReplanRecovery()
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(rendezvous=SETTINGS))
    publish(c, plan, {r: {**entry(steps=steps_of(1, 3, 0.1)), "arrived": 1, "arrived_at": 1.0,
                          "startup_s": 9.0 if r == 3 else 2.0, "pid": 10 + r} for r in range(4)})
    asyncio.run(loop.tick(5.0))
    # generation 2: the slow starter is gone; its start-up still bounds the deadline (3 x 9 s)
    g2 = plan.__class__.from_dict({**plan.to_dict(), "generation": 2})
    c.put(KEYS.job_plan(JOB), g2.to_json())
    ranks = {r: {**entry(generation=2, steps=steps_of(1, 3, 0.1, step_time=0.2)), "arrived": 2, "arrived_at": 10.0,
                 "startup_s": 2.0, "pid": 10 + r} for r in range(3)}
    publish(c, g2, ranks)  # rank 3's node now reports rank 2 only
    asyncio.run(loop.tick(10.0))  # generation 2 first seen
    asyncio.run(loop.tick(10.0 + 27.0))
    assert c.recovery.calls == []
    asyncio.run(loop.tick(10.0 + 28.1))
    assert [call[2] for call in c.recovery.calls] == [(3,)]


def test_rendezvous_flags_set_and_validate_the_settings():
    s = health_settings_from_args(controller_flags("--rendezvous-floor-s=2", "--rendezvous-cap-s=30",
                                                   "--rendezvous-startup-factor=2", "--rendezvous-step-k=3"))
    assert s.rendezvous == RendezvousSettings(floor_s=2, cap_s=30, startup_factor=2, step_k=3)
    assert health_settings_from_args(controller_flags()).rendezvous == RendezvousSettings()
    for bad in ("--rendezvous-floor-s=0", "--rendezvous-cap-s=1", "--rendezvous-startup-factor=0.5",
                "--rendezvous-step-k=-1"):
        with pytest.raises(ValueError, match=f"^{bad.partition('=')[0]}: "):
            health_settings_from_args(controller_flags(bad))
