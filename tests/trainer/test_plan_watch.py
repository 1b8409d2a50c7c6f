"""The worker's plan watch retries a temporary etcd error (unreachable) and gives up at once on
a permanent one (here: an unreadable TLS file), saying why."""

from __future__ import annotations

import socket
import time

import pytest

from common.etcd import EtcdError, EtcdTls
from trainer.plan_watch import PlanWatcher


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(30)
def test_a_permanent_etcd_error_ends_the_watch(tmp_path):
    watcher = PlanWatcher(f"https://127.0.0.1:{_closed_port()}", "/tenax/jobs/j/plan",
                          tls=EtcdTls(ca_file=str(tmp_path / "no-such-ca.pem")))
    deadline = time.monotonic() + 10
    while watcher.stopped_by is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(watcher.stopped_by, EtcdError) and "no-such-ca.pem" in str(watcher.stopped_by)
    watcher._thread.join(5)
    assert not watcher._thread.is_alive()
    with pytest.raises(TimeoutError):
        watcher.wait_newer(0, 0.1)


@pytest.mark.timeout(30)
def test_an_unreachable_etcd_is_retried(tmp_path):
    watcher = PlanWatcher(f"http://127.0.0.1:{_closed_port()}", "/tenax/jobs/j/plan")
    try:
        time.sleep(2.0)  # several connection attempts (backoff from 0.1 s)
        assert watcher.stopped_by is None and watcher._thread.is_alive()
        assert watcher.unreachable_since is not None
        # a worker waiting for its recovery's plan says what it waits for
        with pytest.raises(TimeoutError, match=r"etcd unreachable for \d+ s; waiting for it"):
            watcher.wait_newer(1, 0.2)
    finally:
        watcher.close()
