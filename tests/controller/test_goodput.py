"""controller/goodput.py: ETTR and the time lost by cause (pure)."""

from __future__ import annotations

import pytest

from controller.goodput import compute
from protos.records import StepRecord


def steps(*runs: tuple) -> list[StepRecord]:
    """(step, time, step time[, generation: 1])"""
    return [StepRecord(step=r[0], loss=1.0, time=r[1], step_time_s=r[2], generation=r[3] if len(r) > 3 else 1)
            for r in runs]


def test_a_clean_run():
    g = compute(created=0.0, end=12.0, steps=steps((1, 3.0, 1.0), (2, 4.0, 1.0), (3, 5.0, 1.0)), recoveries=[])
    assert (g.pending_s, g.productive_s, g.replayed_s, g.recovery_s) == (2.0, 3.0, 0.0, 0.0)
    assert g.stall_s == pytest.approx(7.0) and g.ratio == pytest.approx(0.25)


def test_a_recovery_its_replayed_step_and_a_planned_switch():
    # step 3 ran, then a failure: 2 s of recovery, step 3 ran again; a planned growth stalled 0.5 s
    runs = steps((1, 2.0, 1.0), (2, 3.0, 1.0), (3, 4.0, 1.0), (3, 7.0, 1.0, 2), (4, 8.0, 1.0, 2))
    recoveries = [{"cause": "worker-failed", "total_s": 2.0, "switch_at_step": -1},
                  {"cause": "grow", "total_s": 3.0, "switch_at_step": 10, "worker_total_s": 0.5}]
    g = compute(created=0.0, end=10.0, steps=runs, recoveries=recoveries)
    assert g.productive_s == 4.0 and g.replayed_s == 1.0 and g.pending_s == 1.0 and g.recovery_s == 2.0
    assert g.stall_s == pytest.approx(2.0) and g.ratio == pytest.approx(0.4)
    assert sum(g.lost().values()) + g.productive_s == pytest.approx(g.wall_s)


def test_a_run_re_sent_for_a_lost_metrics_rank_is_the_same_run_not_a_replay():
    # steps 2 and 3 of generation 1 arrive twice (the survivor's copies after the lost metrics
    # rank's own), written after generation 2's run of step 4
    runs = steps((1, 2.0, 1.0), (2, 3.0, 1.0), (3, 4.0, 1.0), (4, 7.0, 1.0, 2), (2, 3.0, 0.9), (3, 4.0, 0.9))
    g = compute(created=0.0, end=10.0, steps=runs, recoveries=[])
    assert g.replayed_s == 0.0 and g.productive_s == 4.0


def test_nothing_ran_yet_is_all_pending_and_the_parts_never_exceed_the_wall():
    g = compute(created=5.0, end=8.0, steps=[], recoveries=[])
    assert (g.ratio, g.pending_s, g.wall_s) == (0.0, 3.0, 3.0)
    g = compute(created=0.0, end=1.0, steps=steps((1, 1.0, 5.0)), recoveries=[{"total_s": 9.0}])
    assert g.productive_s == 1.0 and g.recovery_s == 0.0 and g.stall_s == 0.0


def test_an_active_job_is_re_read_each_second_until_its_first_steps_then_every_ten(monkeypatch):
    """Read once at its start, before any step, a job's goodput gauge said 0 for up to 10 s
    after it began stepping (a hang e2e test scraped it then)."""
    import asyncio
    from types import SimpleNamespace

    from controller import goodput

    reads: list[float] = []
    written: list[StepRecord] = []

    async def all_step_runs(etcd, keys, job_id):
        reads.append(job_id)
        return list(written)

    monkeypatch.setattr(goodput, "all_step_runs", all_step_runs)
    tracker = goodput.GoodputTracker(SimpleNamespace(etcd=None, keys=None))
    job = SimpleNamespace(id="j", active=True,
                          status=SimpleNamespace(created=0.0, updated=0.0, recoveries=[], phase="RUNNING"))

    def ratio_at(now: float) -> float:
        return asyncio.run(tracker.get(job, now)).ratio

    assert ratio_at(1.0) == 0.0 and len(reads) == 1
    assert ratio_at(1.5) == 0.0 and len(reads) == 1  # within a second: not re-read
    written.extend(steps((1, 2.0, 1.0), (2, 3.0, 1.0)))
    assert ratio_at(2.6) == pytest.approx(2.0 / 2.6) and len(reads) == 2  # no steps yet: re-read after 1 s
    ratio_at(5.0)
    assert len(reads) == 2  # it has steps: every REFRESH_S from now on
    ratio_at(2.6 + goodput.REFRESH_S + 0.1)
    assert len(reads) == 3
