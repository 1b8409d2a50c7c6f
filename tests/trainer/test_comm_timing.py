"""Per-step communication times (trainer/comm.py): wall time by default, CUDA events on CUDA."""

import time

import pytest
import torch

from trainer import comm

pytestmark = pytest.mark.timeout(60)


class SlowWork:
    def __init__(self, s):
        self.s = s

    def wait(self):
        time.sleep(self.s)


def test_wall_time_per_kind_and_peer_then_reset():
    comm.set_device_timing(False)
    comm.drain()
    comm.wait(SlowWork(0.05), "pipeline receive", peer=3)
    comm.wait([SlowWork(0.02), SlowWork(0.02)], "gradient all-reduce")
    out = comm.drain()
    assert out["kind"]["pipeline receive"] >= 0.05 and out["kind"]["gradient all-reduce"] >= 0.04
    assert out["peer"] == {"pipeline receive|3": out["kind"]["pipeline receive"]}
    assert comm.drain() == {"kind": {}, "peer": {}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_the_device_not_the_host():
    """A wait that returns at once on the host while the stream still runs 'communication'
    (a big matmul enqueued inside the wait) is timed by the device; a host sleep outside is not."""
    comm.set_device_timing(True)
    try:
        comm.drain()
        a = torch.randn(4096, 4096, device="cuda")

        class DeviceWork:
            def wait(self):
                for _ in range(20):
                    a @ a

        comm.wait(DeviceWork(), "gradient all-reduce")
        time.sleep(0.2)  # host time after the wait: not communication
        out = comm.drain()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        matmuls = time.perf_counter() - t
        assert 0.3 * matmuls < out["kind"]["gradient all-reduce"] < 0.2 + matmuls
    finally:
        comm.set_device_timing(False)
