"""trainer.abort: survivors of a dead or hung peer are released within ~1 s and re-form.

Real processes over gloo. The test serves the store, plays the controller
(kills, stops, sets the abort key) and kills every process it started.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist_harness import Workers
from trainer.abort import ABORT_KEY, AbortSettings, AbortWatcher, CommAborted, CommFailed


def run_abort(tmp_path, scenario: str, sig: int, *, controller_aborts: bool):
    workers = Workers(scenario, 3, tmp_path)
    try:
        workers.wait_key("victim-ready", timeout_s=90)
        time.sleep(0.3)  # the survivors are now blocked in the step's collective
        failed_at = workers.signal(2, sig)
        if controller_aborts:  # a hang is seen by heartbeats; the controller's plan g+1 aborts
            dist.PrefixStore("g1/", workers.store).set(ABORT_KEY, "plan g2: rank 2 hung")
            failed_at = time.time()
        codes = workers.wait_exit([0, 1], timeout_s=60)
        assert codes == {0: 0, 1: 0}, workers.log(0) + workers.log(1)
        results = [workers.result(r) for r in (0, 1)]
    finally:
        workers.kill_all()
    for r in results:
        assert r["error"] in ("CommFailed", "CommAborted"), r
        assert r["step"] == 3
        assert r["g2_sum"] == [2.0] * 4  # the two survivors, same processes, new prefix
    latency = max(r["released_at"] for r in results) - failed_at
    return latency, results


@pytest.mark.parametrize("scenario", ["abort-allreduce", "abort-pipeline"])
def test_survivors_of_a_killed_peer_are_released_and_reform_without_restarting(tmp_path, scenario):
    latency, results = run_abort(tmp_path, scenario, signal.SIGKILL, controller_aborts=False)
    print(f"{scenario}: released {latency:.3f} s after kill -9; re-formed in "
          f"{max(r['reform_s'] for r in results):.3f} s; old groups destroyed "
          f"{max(r['reaped_s'] for r in results):.2f} s later")
    assert latency < 1.0
    for r in results:  # the old generation's groups are destroyed off the training thread
        assert r["parked_left"] == 0 and r["gloo_threads_after"] < r["gloo_threads_before"], r
        assert r["computed_meanwhile"] > 0, r
    if scenario == "abort-pipeline":
        # rank 0 never talked to the victim: it was released by rank 1's abort key
        assert results[0]["error"] == "CommAborted" and "abort key set" in results[0]["message"]


def test_survivors_of_a_hung_peer_are_released_by_the_abort_key(tmp_path):
    latency, results = run_abort(tmp_path, "abort-allreduce", signal.SIGSTOP, controller_aborts=True)
    print(f"SIGSTOP: released {latency:.3f} s after the abort key; re-formed in "
          f"{max(r['reform_s'] for r in results):.3f} s")
    assert latency < 1.0
    assert all(r["error"] == "CommAborted" for r in results)


# ------------------------------------------------- the watcher alone (fake works)
class FakeWork:
    """A Work whose completion the test controls; ``future=False`` behaves like
    gloo's send/recv works (no future; wait() blocks)."""

    def __init__(self, *, future: bool = True) -> None:
        self._done = threading.Event()
        self._error: Exception | None = None
        self._future = torch.futures.Future() if future else None
        self.waits = 0

    def finish(self, error: Exception | None = None) -> None:
        self._error = error
        self._done.set()
        if self._future is not None:
            self._future.set_result(None)

    def get_future(self):
        if self._future is None:
            raise RuntimeError("Work::getFuture not implemented.")
        return self._future

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout=None) -> bool:
        """Like c10d: a timed wait that runs out raises "Operation timed out!" (for a
        collective, harmlessly); the test fails if a send/recv is ever waited on with one."""
        self.waits += 1
        if timeout is not None:
            assert self._future is not None, "a timed wait on a send/recv closes gloo's pair"
            if not self._done.wait(timeout.total_seconds()):
                raise RuntimeError("Operation timed out!")
        elif not self._done.wait(30):
            raise RuntimeError("fake work never finished")
        if self._error is not None:
            raise self._error
        return True


class FakeStore:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def check(self, keys) -> bool:
        return all(k in self.values for k in keys)

    def get(self, key: str) -> bytes:
        return self.values[key]


@pytest.mark.parametrize("future", [True, False])
def test_wait_returns_when_the_work_completes(future):
    watcher, work = AbortWatcher(rank=0), FakeWork(future=future)
    threading.Timer(0.05, work.finish).start()
    watcher.wait(work, "allreduce", timeout_s=10)
    if future:  # a collective: waited on in C++ a slice at a time
        assert work.waits >= 2
    else:
        assert work.waits == 1  # a gloo send/recv is never waited on twice


@pytest.mark.parametrize("future", [True, False])
def test_abort_from_another_thread_releases_a_blocked_wait(future):
    watcher, work = AbortWatcher(rank=0), FakeWork(future=future)
    threading.Timer(0.05, watcher.abort, args=("plan g2",)).start()
    started = time.monotonic()
    with pytest.raises(CommAborted, match="plan g2"):
        watcher.wait(work, "allreduce", timeout_s=10)
    assert time.monotonic() - started < 1.0
    with pytest.raises(CommAborted):  # the generation stays aborted
        watcher.wait(FakeWork(), "next")
    work.finish()


def test_a_failed_work_tells_the_peers_through_the_store():
    store = FakeStore()
    watcher = AbortWatcher(rank=1)
    watcher.watch_store(store)
    work = FakeWork()
    work.finish(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    with pytest.raises(CommFailed, match="Connection closed"):
        watcher.wait(work, "step 7")
    watcher.close()
    assert store.values[ABORT_KEY].decode().startswith("rank 1: step 7 failed: Connection closed")
    assert watcher.aborted


@pytest.mark.parametrize("future", [True, False])
def test_the_abort_key_set_by_a_peer_releases_a_wait_within_a_poll_interval(future):
    store = FakeStore()
    watcher, work = AbortWatcher(AbortSettings(poll_interval_s=0.01), rank=0), FakeWork(future=future)
    seen = []
    watcher.on_abort.append(seen.append)
    watcher.watch_store(store)
    assert not watcher.check_store()
    threading.Timer(0.1, store.set, args=(ABORT_KEY, "rank 2: step 3 failed")).start()
    started = time.monotonic()
    with pytest.raises(CommAborted, match="abort key set: rank 2: step 3 failed"):
        watcher.wait(work, "allreduce", timeout_s=10)
    assert 0.1 <= time.monotonic() - started < 1.0
    assert seen == ["abort key set: rank 2: step 3 failed"] and watcher.aborted
    work.finish()


def test_a_store_that_cannot_be_read_does_not_fail_the_wait():
    class BrokenStore(FakeStore):
        def check(self, keys):
            raise RuntimeError("Connection reset by peer")

    watcher, work = AbortWatcher(AbortSettings(poll_interval_s=0.01), rank=0), FakeWork()
    watcher.watch_store(BrokenStore())
    threading.Timer(0.1, work.finish).start()
    watcher.wait(work, "allreduce", timeout_s=10)  # the work completes; the key is just unknown
    assert not watcher.aborted


def test_a_wait_past_its_timeout_raises_and_aborts_the_generation():
    watcher, work = AbortWatcher(rank=0), FakeWork()
    with pytest.raises(TimeoutError):
        watcher.wait(work, "allreduce", timeout_s=0.05)
    assert watcher.aborted and "timed out" in watcher.reason
    work.finish()


# ------------------------------------------------- the abortable rendezvous of a generation
def test_rendezvous_returns_once_every_rank_announced_itself():
    from trainer.abort import JOINED_KEY, rendezvous

    store = FakeStore()
    store.set(JOINED_KEY + "0", "1")
    threading.Timer(0.1, store.set, args=(JOINED_KEY + "2", "1")).start()
    waited = rendezvous(store, rank=1, world_size=3, timeout_s=10, poll_s=0.005)
    assert 0.05 < waited < 5 and store.check([JOINED_KEY + "1"])


def test_rendezvous_tells_on_arrive_once_it_announced_itself_and_before_the_others_came():
    from trainer.abort import JOINED_KEY, rendezvous

    store = FakeStore()
    seen: list[bool] = []
    threading.Timer(0.2, store.set, args=(JOINED_KEY + "0", "1")).start()
    rendezvous(store, rank=1, world_size=2, timeout_s=10, poll_s=0.005,
               on_arrive=lambda: seen.append(store.check([JOINED_KEY + "1"]) and not store.check([JOINED_KEY + "0"])))
    assert seen == [True]


def test_rendezvous_gives_up_at_once_on_a_newer_plan_or_the_abort_key():
    from trainer.abort import rendezvous

    newer: list[str] = []
    threading.Timer(0.1, newer.append, args=("plan generation 3 appeared while forming",)).start()
    started = time.monotonic()
    with pytest.raises(CommAborted, match="plan generation 3"):
        rendezvous(FakeStore(), rank=0, world_size=2, timeout_s=30, poll_s=0.005,
                   should_abort=lambda: newer[0] if newer else None)
    assert time.monotonic() - started < 1.0

    store = FakeStore()
    threading.Timer(0.1, store.set, args=(ABORT_KEY, "rank 1 gave up")).start()
    started = time.monotonic()
    with pytest.raises(CommAborted, match="rank 1 gave up"):
        rendezvous(store, rank=0, world_size=2, timeout_s=30, poll_s=0.005)
    assert time.monotonic() - started < 1.0


def test_rendezvous_times_out_naming_the_ranks_that_never_came():
    from trainer.abort import rendezvous

    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1, 2\] did not join"):
        rendezvous(FakeStore(), rank=0, world_size=3, timeout_s=0.1, poll_s=0.01)


def test_form_group_over_a_real_store_is_released_when_a_participant_never_joins():
    """A real TCPStore (served here) and the generation prefix: rank 0 of a 2-rank group waits in
    form_group for rank 1, which died before it joined; a newer plan releases it in well under the
    60 s init_process_group would have blocked."""
    from trainer.abort import JOINED_KEY, form_group

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False)
    plans: list[str] = []
    threading.Timer(0.3, plans.append, args=("plan generation 3 appeared while forming",)).start()
    started = time.monotonic()
    with pytest.raises(CommAborted, match="plan generation 3"):
        form_group(client, "job/g2/", rank=0, world_size=2, timeout_s=60,
                   should_abort=lambda: plans[0] if plans else None)
    took = time.monotonic() - started
    print(f"rendezvous released {took - 0.3:.3f} s after the newer plan")
    assert took < 2.0
    scoped = dist.PrefixStore("job/g2/", server)
    assert scoped.check([f"{JOINED_KEY}0"]) and not scoped.check([f"{JOINED_KEY}1"])
    assert not dist.is_initialized()  # nothing of the aborted generation was formed
