"""The soak (issue #16): one job through a seeded random mix of faults on a local cluster.

The short version runs in CI: >= 15 faults of every kind (worker kill -9, worker
SIGSTOP, agent kill -9 + restart under the same node id, controller kill -9 +
restart on its address, etcd kill -9 + restart on its data); the job must
SUCCEED at its full size, every step's loss must equal an uninterrupted run of
the same spec (rtol 1e-4), and no more steps may be lost than faults were
injected. ``bench/soak.py`` is the same run with more faults. The report math
(pure) is tested on its own first.
"""

from __future__ import annotations

import math
import os

import pytest

from bench import soak

FAULTS = int(os.environ.get("TENAX_SOAK_FAULTS", "15"))
"""Faults of the CI soak (more: ``TENAX_SOAK_FAULTS=100``)."""


# ------------------------------------------------------------------ report math (pure)
def test_fault_schedule_is_a_function_of_the_seed_and_draws_every_kind():
    a = soak.fault_schedule(3, 40, soak.KINDS)
    assert a == soak.fault_schedule(3, 40, soak.KINDS)
    assert a != soak.fault_schedule(4, 40, soak.KINDS)
    assert {kind for kind, _ in a} == set(soak.KINDS)
    for kind, delay in a:
        low, high = soak.RESTART_DELAY_S.get(kind, (0.0, 0.0))
        assert low <= delay <= high, (kind, delay)


def test_mttr_is_the_time_until_the_job_trains_past_where_it_was():
    records = [{"step": 1, "time": 1.0, "step_time": 1.0, "generation": 1},
               {"step": 2, "time": 2.0, "step_time": 1.0, "generation": 1},
               {"step": 3, "time": 3.0, "step_time": 1.0, "generation": 1},
               {"step": 3, "time": 9.0, "step_time": 2.0, "generation": 2},  # re-run after a recovery: not new
               {"step": 4, "time": 10.0, "step_time": 1.5, "generation": 2},  # the rank that began it first ...
               {"step": 4, "time": 10.2, "step_time": 1.9, "generation": 2},  # ... is this one (8.3)
               {"step": 5, "time": 11.0, "generation": 2}]  # a line without its step time: began at its time
    progress = soak.progress_times(records)
    assert progress == [(1.0, 1, 0.0), (2.0, 2, 1.0), (3.0, 3, 2.0), (10.0, 4, pytest.approx(8.3)),
                        (11.0, 5, 11.0)]
    assert soak.time_to_progress(3.5, progress, end=11.0) == pytest.approx(4.8)  # 3.5 -> step 4 began at 8.3
    assert soak.time_to_progress(1.5, progress, end=11.0) == 0.0  # step 2 was under way: training went on
    assert soak.time_to_progress(11.5, progress, end=20.0) == pytest.approx(8.5)  # none after: until the end


def test_each_fault_gets_the_phases_of_its_own_recovery_and_growth_back():
    faults = [{"kind": "worker-hang", "time": 100.0, "index": 0}, {"kind": "etcd-kill", "time": 120.0, "index": 1},
              {"kind": "node-lost", "time": 140.0, "index": 2}]
    recoveries = [
        {"cause": "hang: rank 1 made no progress", "time": 104.6, "total_s": 0.5, "rebuild_s": 0.2,
         "transfer_s": 0.1, "layout": "dp1pp3"},
        {"cause": "grow", "time": 108.0, "total_s": 2.0, "rebuild_s": 0.1, "transfer_s": 0.1, "layout": "dp2pp2"},
        {"cause": "node-lost", "time": 139.2, "total_s": 3.5, "rebuild_s": 0.3, "transfer_s": 0.1,
         "layout": "dp1pp2"},  # the lost node's last heartbeat predates the fault
    ]
    rows = soak.fault_recoveries(faults, recoveries)
    assert rows[0] == {"index": 0, "kind": "worker-hang", "cause": "hang: rank 1 made no progress",
                       "until_failure_s": 4.6, "recovery_s": 0.5, "rebuild_s": 0.2, "transfer_s": 0.1,
                       "layout": "dp1pp3", "full_size_s": 10.0}
    assert rows[1] == {"index": 1, "kind": "etcd-kill"}  # training never stopped: no recovery
    assert rows[2]["until_failure_s"] == -0.8 and rows[2]["recovery_s"] == 3.5 and "full_size_s" not in rows[2]
    summary = soak.phase_summary(rows)
    assert summary["worker-hang"] == {"until_failure_s": 4.6, "recovery_s": 0.5, "full_size_s": 10.0, "n": 1}
    assert summary["etcd-kill"]["n"] == 0 and summary["etcd-kill"]["recovery_s"] is None


def test_steps_redone_counts_every_later_generation_that_trained_a_step_again():
    records = [{"step": 1, "generation": 1}, {"step": 1, "generation": 1},  # two ranks' lines of one step
               {"step": 2, "generation": 1}, {"step": 3, "generation": 1},
               {"step": 2, "generation": 3}, {"step": 3, "generation": 3},  # g1's state lost: 2 and 3 again
               {"step": 3, "generation": 4}, {"step": 4, "generation": 4}]  # and 3 once more
    assert soak.steps_redone(records) == 3
    assert soak.steps_redone([{"step": s, "generation": 1} for s in range(1, 5)]) == 0


def test_loss_check_needs_every_step_and_every_record_equal():
    ref = {1: 4.0, 2: 3.0, 3: 2.0}
    assert soak.loss_check({1: [4.0], 2: [3.0, 3.0000001], 3: [2.0]}, ref, 3)["equal"]
    missing = soak.loss_check({1: [4.0], 3: [2.0]}, ref, 3)
    assert not missing["equal"] and missing["missing_steps"] == [2]
    bad = soak.loss_check({1: [4.0], 2: [3.0, 3.1], 3: [2.0]}, ref, 3)
    assert not bad["equal"] and bad["mismatches"] == [{"step": 2, "loss": 3.1, "reference": 3.0}]


def test_percentile_and_settings_validation():
    assert soak.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert math.isnan(soak.percentile([], 0.5))
    with pytest.raises(ValueError, match="--kinds"):
        soak.SoakSettings(kinds=("meteor",)).validate()
    with pytest.raises(ValueError, match="4 slots"):
        soak.SoakSettings(agents=1, slots=2).validate()


# ------------------------------------------------------------------ the soak
@pytest.mark.e2e
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_random_faults_job_succeeds_with_the_same_losses(tmp_path):
    settings = soak.SoakSettings(faults=FAULTS, seed=16, interval_s=4.0, state_dir=tmp_path / "cluster")
    report = soak.run(settings)
    soak.print_table(report)
    assert report["faults_injected"] >= min(FAULTS, 15), report
    assert report["succeeded"], (report["phase"], report["message"], report["state_dir"])
    assert report["losses"]["equal"], report["losses"]
    assert report["steps_lost"] <= report["faults_injected"], report
    assert report["steps_redone"] <= report["faults_injected"], report
    assert report["final_size"] == report["full_size"], report
