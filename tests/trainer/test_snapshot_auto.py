"""``snapshot_every: auto`` (issue 15): the default, an interval derived from measured times, and
a job that runs with it still recovers within the steps its status said were at risk."""

from __future__ import annotations

import pytest

from common.spec import JobSpec
from protos import launch
from tests.helpers.elastic_harness import ElasticJob, tiny_spec
from trainer.decisions import (MAX_AUTO_INTERVAL, PROBE_STEPS, auto_snapshot_interval, probe_snapshot_due)
from trainer.settings import ElasticSettings


def test_auto_is_the_default_interval():
    assert JobSpec.from_dict({}).elastic.snapshot_every == "auto"
    assert ElasticSettings().snapshot_every == "auto"


@pytest.mark.parametrize("copy_s, step_s, wait_s, stall_s, expected", [
    (0.001, 0.05, 0.0, 0.0, 1),      # a small state: every step
    (0.29, 0.30, 0.0, 0.0, 1),       # the H200 copy of 16 GB fits in one 0.30 s step, costing nothing extra
    (0.29, 0.30, 0.0, 0.022, 4),     # ... but a 22 ms stall per snapshot (7.4 %) needs every 4th step for 2 %
    (0.62, 0.30, 0.0, 0.0, 3),       # a copy longer than two steps: the next one would be skipped
    (0.001, 0.05, 0.08, 0.0, 3),     # a replication round held the boundary 0.08 s: 0.13 s per round
    (5.0, 0.01, 0.0, 0.0, MAX_AUTO_INTERVAL),  # capped
    (0.1, 0.0, 0.0, 0.0, 1),         # no step time measured
])
def test_auto_interval_comes_from_the_measured_times(copy_s, step_s, wait_s, stall_s, expected):
    assert auto_snapshot_interval(copy_s, step_s, wait_s, stall_s) == expected


def test_auto_interval_keeps_the_average_stall_within_the_budget():
    for stall_s in (0.0005, 0.003, 0.01, 0.05):
        k = auto_snapshot_interval(0.01, 0.1, stall_s=stall_s, budget=0.03)
        assert stall_s / k <= 0.03 * 0.1 + 1e-12
        assert k == 1 or stall_s / (k - 1) > 0.03 * 0.1  # the smallest such interval


def test_the_probe_leaves_one_clean_step_after_an_overlapped_one():
    assert [o for o in range(1, PROBE_STEPS + 1) if probe_snapshot_due(o)] == [1, 2, PROBE_STEPS]


@pytest.mark.parametrize("buffers", ["3", "2"])
def test_a_job_with_auto_recovers_losing_no_more_than_its_steps_at_risk(tmp_path, etcd_url, buffers):
    """``buffers``: TENAX_SNAPSHOT_BUFFERS, the cap on the own snapshots' host copies."""
    steps = 12
    spec = tiny_spec(steps=steps, dp=2, pp=1, snapshot_every="auto")
    job = ElasticJob(spec, tmp_path / "job", etcd_url, env={launch.SNAPSHOT_BUFFERS: buffers})
    try:
        job.start(faults="rank=1,step=8,kind=kill,when=mid")
        dead, _ = job.kill_and_replan()
        codes = job.wait_all()
    finally:
        job.close()
    survivor = next(w for w in codes if w != dead)
    assert codes[survivor] == 0, job.logs()
    first = [r for r in job.steps(*survivor) if r["generation"] == 1]
    dead_lines = [r for r in job.steps(*dead) if r["generation"] == 1]
    # every rank stated the interval auto picked after the probe, the same on both
    (picked,) = {r["snapshot_every"] for r in first + dead_lines if r["step"] > PROBE_STEPS}
    assert 1 <= picked <= MAX_AUTO_INTERVAL
    assert all(r.get("snapshot_host_bytes", 0) > 0 for r in first if r["step"] > 1)
    # host copies of the state a rank keeps: its own snapshots plus the replica (double buffered)
    copies = max(r["snapshot_host_copies"] for r in first + dead_lines if "snapshot_host_copies" in r)
    assert copies <= int(buffers) + 2 + 0.2, copies
    # what the job status says is at risk: the step minus the newest step every rank's copy covers
    by_step: dict[int, list[int]] = {}
    for r in first + dead_lines:
        by_step.setdefault(r["step"], []).append(r["recoverable_step"])
    last = max(s for s, held in by_step.items() if len(held) == 2)
    at_risk = last - min(by_step[last])
    (rec,) = job.recoveries(*survivor)
    assert not rec["from_disk"] and rec["bad_copies"] == []
    assert rec["at_step"] >= last
    # the step in flight when rank 1 died (at most one past ``last``) is never counted as lost
    assert rec["steps_lost"] <= at_risk + (rec["at_step"] - last), (rec, at_risk, last)
    assert job.steps(*survivor)[-1]["step"] == steps
