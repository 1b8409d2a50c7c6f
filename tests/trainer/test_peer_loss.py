"""A peer (or the node serving the rendezvous store) is lost mid-training: the survivors must
recover in process, never crash and never sit out a store timeout.

Found by the node-loss soak (`bench/soak.py --faults 10 --interval 20 --seed 4`): a survivor's
pipeline ``isend`` raised "Connection closed by peer" as it was posted, outside the abortable
wait, and the worker exited 1 (the abort key that would have said "stop" lived in the store,
on the lost node); another survivor sat 30 s connecting to that store although newer plans
had come. Real worker processes, gloo, a real etcd and kill -9 in the end-to-end tests here
(tests/helpers/elastic_harness.py plays the control side).
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time

import pytest
import torch.distributed as dist

from common.layout import new_store_secret, store_prefix
from protos import launch
from tests.helpers.elastic_harness import ElasticJob, reference_losses, tiny_spec
from trainer import comm
from trainer.abort import (ABORT_KEY, CONNECT_ATTEMPT_S, LEFT_BEHIND_GRACE_S, AbortWatcher, CommAborted, CommFailed,
                           connect_store, generation_store, join_left_behind_connects)
from trainer.decisions import error_stops_generation

pytestmark = pytest.mark.timeout(150)

GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:16102. This is typically caused by a remote worker crashing.")
"""The exception text of the soak's crashed survivor (torch 2.13, gloo)."""


# ------------------------------------------------------------------ pure decision
def test_an_error_outside_the_waits_stops_a_formed_generation_only_if_it_is_a_communication_failure():
    stop, why = error_stops_generation(GLOO_CLOSED, formed=True, aborted=False)
    assert stop and "peer-died" in why, why
    stop, why = error_stops_generation("NCCL error: unhandled system error", formed=True, aborted=False)
    assert stop and "nccl-error" in why, why
    # a bug stays a crash (exit 1) ...
    stop, why = error_stops_generation("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)",
                                       formed=True, aborted=False)
    assert not stop, why
    # ... unless the generation was aborted before it (an error that follows the abort)
    assert error_stops_generation("mat1 and mat2 shapes", formed=True, aborted=True)[0]
    # no generation yet (the launch itself): nothing to recover in
    assert not error_stops_generation(GLOO_CLOSED, formed=False, aborted=False)[0]


# ------------------------------------------------------------------ posting errors
def test_an_error_while_posting_goes_to_the_watcher_which_tells_the_peers():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    watcher = AbortWatcher(rank=0)
    watcher.watch_store(generation_store("127.0.0.1", server.port, "gen1/"))

    def closed_pair():
        raise RuntimeError(GLOO_CLOSED)

    with pytest.raises(RuntimeError, match="Connection closed"):  # plain runs: raised as it is
        comm.post(closed_pair, "pipeline send")
    comm.set_waiter(watcher.wait, post_failed=watcher.failed)
    try:
        with pytest.raises(CommFailed, match="pipeline send failed: .*Connection closed"):
            comm.post(closed_pair, "pipeline send")
        assert comm.post(lambda: "work", "pipeline send") == "work"
    finally:
        comm.set_waiter(None)
        watcher.close()
    assert watcher.aborted
    reason = dist.PrefixStore("gen1/", server).get(ABORT_KEY).decode()
    assert reason.startswith("rank 0: pipeline send failed: [") and "Connection closed" in reason, reason


# ------------------------------------------------------------------ store connect
def _silent_listener() -> socket.socket:
    """A port that completes the TCP handshake and never answers (a lost node's store port
    still held open): TCPStore's constructor does not return on its own against it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_connecting_to_a_silent_store_gives_up_on_a_newer_plan_or_at_its_timeout():
    silent = _silent_listener()
    port = silent.getsockname()[1]
    try:
        started = time.monotonic()
        newer_after = started + 0.3
        with pytest.raises(CommAborted, match="plan generation 3"):
            connect_store("127.0.0.1", port, timeout_s=30,
                          should_abort=lambda: "plan generation 3" if time.monotonic() > newer_after else None)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            connect_store("127.0.0.1", port, timeout_s=1.0)
        assert 0.9 < time.monotonic() - started < 2.0
    finally:
        silent.close()
    # the attempts given up on end within an attempt's length (not the whole timeout) once the
    # port answers no more; the interpreter's exit waits for them (an attempt returning into a
    # finalising interpreter aborts the process)
    started = time.monotonic()
    assert join_left_behind_connects() == 0
    assert time.monotonic() - started < CONNECT_ATTEMPT_S + LEFT_BEHIND_GRACE_S
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = connect_store("127.0.0.1", server.port, timeout_s=7.0, should_abort=lambda: None)
    client.set("k", "v")
    assert server.get("k") == b"v" and client.timeout.total_seconds() == 7.0


# ------------------------------------------------------------------ real processes
def _same_losses(job: ElasticJob, where, reference: dict[int, float], steps: int) -> None:
    last = {}
    for r in job.steps(*where):
        last[r["step"]] = r["loss"]
    assert sorted(last) == list(range(1, steps + 1)), sorted(last)
    for step, loss in last.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-4), (step, loss, reference[step])


def test_a_send_posted_to_a_dead_pipeline_peer_stops_the_generation_and_the_survivor_recovers(tmp_path, etcd_url):
    spec = tiny_spec(steps=10, dp=1, pp=2)
    reference = reference_losses(spec, tmp_path / "reference")
    job = ElasticJob(spec, tmp_path / "job", etcd_url)
    try:
        # rank 1 (the last stage) dies at the boundary after step 4; rank 0 posts its first
        # send of step 5 a second late, when the connection to rank 1 is already closed:
        # gloo raises as the send is posted, before there is a work to wait on
        job.start(faults="rank=1,step=4,kind=kill;rank=0,step=5,kind=delay_send,peer=1,seconds=1.0")
        pid = job.procs[("a", 0)].pid
        dead, code, _ = job.wait_for_death()
        assert dead == ("b", 0) and code == -9, job.logs()
        # no newer plan yet (and nobody set the abort key): the failed post alone must stop it
        deadline = time.monotonic() + 30
        while "generation 1 stopped at step" not in job.log("a", 0):
            assert job.procs[("a", 0)].poll() is None, f"the survivor exited\n{job.logs()}"
            assert time.monotonic() < deadline, job.logs()
            time.sleep(0.05)
        job.write_plan(job.replan_without({1}))
        codes = job.wait_all()
    finally:
        job.close()
    assert codes[("a", 0)] == 0, job.logs()
    log = job.log("a", 0)
    assert "pipeline send failed: [" in log and "Connection closed by peer" in log, log
    assert {r["pid"] for r in job.steps("a", 0)} == {pid}  # recovered in process
    (rec,) = job.recoveries("a", 0)
    assert rec["cause"] == "comm-failed" and rec["comm_error"] == "peer-died", rec
    assert rec["old_layout"] == "dp1pp2z1" and rec["new_layout"] == "dp1pp1z1" and rec["steps_lost"] == 0, rec
    _same_losses(job, ("a", 0), reference, spec.steps)


def test_a_worker_connecting_to_a_lost_store_leaves_as_soon_as_a_newer_plan_switches_now(tmp_path, etcd_url):
    store_timeout_s = 60  # what the survivors would wait without the newer plan cutting it short
    spec = tiny_spec(steps=12, dp=1, pp=2)
    reference = reference_losses(spec, tmp_path / "reference")
    job = ElasticJob(spec, tmp_path / "job", etcd_url, env={launch.STORE_TIMEOUT_S: str(store_timeout_s)})
    silent = _silent_listener()
    try:
        job.start()
        pids = {where: p.pid for where, p in job.procs.items()}
        job.wait_step("a", 0, 3)
        plan1 = job.plan
        # plan 2 moves the rendezvous store to a node that is lost just then: its port answers no more
        plan2 = dataclasses.replace(plan1, generation=2, switch_at_step=-1, reason="test: store node lost",
                                    store_address=f"127.0.0.1:{silent.getsockname()[1]}",
                                    store_prefix=store_prefix(plan1.job_id, 2, new_store_secret()))
        job.write_plan(plan2)
        time.sleep(2.0)  # both survivors left generation 1 and are connecting to the silent store
        plan3 = dataclasses.replace(plan1, generation=3, switch_at_step=-1, reason="test: re-planned",
                                    store_prefix=store_prefix(plan1.job_id, 3, new_store_secret()))
        replanned_at = job.write_plan(plan3)
        codes = job.wait_all(timeout_s=120)
    finally:
        job.close()
        silent.close()
    assert all(code == 0 for code in codes.values()), job.logs()
    for where, pid in pids.items():
        assert {r["pid"] for r in job.steps(*where)} == {pid}
        rec = job.recoveries(*where)[-1]
        # one outage from generation 1 straight to 3; generation 2 never formed
        assert rec["old_generation"] == 1 and rec["new_generation"] == 3, rec
        assert rec["cause"] == "plan+comm-aborted" and rec["steps_lost"] == 0, rec
        took = rec["time"] - replanned_at
        print(f"{where}: ready in generation 3 {took:.2f} s after it was written (store timeout {store_timeout_s} s)")
        assert took < 10, (took, job.logs())
        _same_losses(job, where, reference, spec.steps)
