"""The worker's plan watch follows the plan file its agent relays plans into: every newer
generation is seen within a poll, older or malformed contents are skipped."""

from __future__ import annotations

import threading
import time

import pytest

from common.files import write_atomic
from protos.plan import Plan, WorkerAssignment
from trainer.plan_watch import POLL_S, PlanWatcher


def _plan(generation: int) -> Plan:
    return Plan(job_id="j", generation=generation, workers=(WorkerAssignment(rank=0, node="n", slot=0, dp_rank=0,
                                                                              pp_rank=0),),
                dp=1, pp=1, zero_stage=0, layer_partition=(0, 2), sample_shares=(4,), store_address="h:1",
                store_prefix=f"j/g{generation}/s/")


@pytest.mark.timeout(30)
def test_newer_plans_are_seen_within_a_poll_and_stale_or_malformed_ones_are_skipped(tmp_path):
    path = tmp_path / "plan.json"
    seen: list[tuple[int, float]] = []
    arrived = threading.Event()

    def on_plan(plan: Plan) -> None:
        seen.append((plan.generation, time.monotonic()))
        arrived.set()

    watcher = PlanWatcher(path, on_plan=on_plan)  # no file yet: nothing, no error
    try:
        time.sleep(3 * POLL_S)
        with pytest.raises(TimeoutError, match="waiting for the controller to write it and the agent to relay it"):
            watcher.wait_newer(0, 0.05)  # a worker waiting for its recovery's plan says what it waits for
        latencies = []
        for generation in (1, 2, 3):
            arrived.clear()
            written = time.monotonic()
            write_atomic(path, _plan(generation).to_json())
            assert watcher.wait_newer(generation - 1, 5).generation == generation
            assert arrived.wait(5)
            latencies.append(seen[-1][1] - written)
        assert max(latencies) < POLL_S + 0.1, latencies  # a poll, plus a loaded host's scheduling
        write_atomic(path, "{not json")
        write_atomic(path, _plan(2).to_json())  # older: skipped
        time.sleep(5 * POLL_S)
        assert [g for g, _ in seen] == [1, 2, 3] and watcher.newest.generation == 3
    finally:
        watcher.close()
    watcher._thread.join(5)
    assert not watcher._thread.is_alive()
