"""A participant of generation g+1 dies before it joins the rendezvous (issue 4).

Real worker processes, real etcd, gloo, a real kill -9; the test plays the control
side (tests/helpers/elastic_harness.py). Before the rendezvous was abortable, the survivors
sat in ``init_process_group`` for the whole collective timeout (60 s by default)
before they could read plan g+2; now they poll the store and leave the rendezvous
as soon as the plan without the dead participant appears.
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch.distributed as dist

from protos import launch
from tests.helpers.elastic_harness import ElasticJob, reference_losses, tiny_spec
from trainer.abort import JOINED_KEY

pytestmark = pytest.mark.timeout(150)

COLLECTIVE_TIMEOUT_S = 60
"""The production default backstop: what the survivors used to wait."""


def _joined(job: ElasticJob, plan, rank: int) -> bool:
    return dist.PrefixStore(plan.store_prefix, job.store).check([f"{JOINED_KEY}{rank}"])


def _wait(predicate, timeout_s: float, what: str, job: ElasticJob) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}\n{job.logs()}")


def test_survivors_leave_a_rendezvous_whose_participant_died_as_soon_as_the_next_plan_comes(tmp_path, etcd_url):
    spec = tiny_spec(steps=30, dp=1, pp=2, zero=1, max_workers=4)
    reference = reference_losses(spec, tmp_path / "reference")
    job = ElasticJob(spec, tmp_path / "job", etcd_url, env={launch.COLLECTIVE_TIMEOUT_S: str(COLLECTIVE_TIMEOUT_S)})
    survivors = [("a", 0), ("b", 0)]
    try:
        job.start()
        pids = {where: p.pid for where, p in job.procs.items()}
        job.wait_step("a", 0, 2)
        switch_at = max(r["step"] for r in job.steps("a", 0)) + 3
        plan2 = job.grow_into({"a": [1], "b": [1]}, at_step=switch_at)
        job.write_plan(plan2)
        # the survivors reach the switch step and wait in generation 2's rendezvous
        _wait(lambda: _joined(job, plan2, 0) and _joined(job, plan2, 1), 60, "the survivors in g2's rendezvous", job)
        # the two new workers die before they join (they are still importing torch)
        job.start(plan2)
        joiners = [where for where in job.procs if where not in survivors]
        for where in joiners:
            os.kill(job.procs[where].pid, signal.SIGKILL)
        killed_at = time.time()
        for where in joiners:
            job.procs[where].wait(10)
        assert not any(_joined(job, plan2, plan2.worker(r).rank) for r in (2, 3)), "a joiner joined before it died"
        # the controller's part: plan 3 without them (the layout of plan 1 again)
        plan3 = job.replan_without({2, 3})
        assert plan3.world_size == 2
        replanned_at = job.write_plan(plan3)
        codes = job.wait_all(timeout_s=90)
    finally:
        job.close()
    assert all(codes[w] == 0 for w in survivors), job.logs()
    recovered = []
    for where in survivors:
        assert {r["pid"] for r in job.steps(*where)} == {pids[where]}  # never restarted
        rec = job.recoveries(*where)[-1]
        # one outage from generation 1 (the switch) straight to 3, generation 2 never trained
        assert rec["old_generation"] == 1 and rec["new_generation"] == 3, rec
        assert rec["cause"] == "switch+comm-aborted" and rec["steps_lost"] == 0, rec
        assert rec["resumed_step"] == switch_at and not rec["from_disk"], rec
        recovered.append(rec["time"])
        last = {}
        for r in job.steps(*where):
            last[r["step"]] = r["loss"]
        assert sorted(last) == list(range(1, spec.steps + 1))
        assert all(math.isclose(loss, reference[s], rel_tol=1e-4) for s, loss in last.items())
    took = max(recovered) - killed_at
    print(f"participants killed before the rendezvous: survivors ready in generation 3 {took:.2f} s after "
          f"the kill ({max(recovered) - replanned_at:.2f} s after plan 3 was written); "
          f"the backstop was {COLLECTIVE_TIMEOUT_S} s")
    assert took < 15, took
