"""A recovering rank waits for processes still exiting on its GPU (trainer/gpu_release.py)."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from common.procexit import is_tearing_down
from trainer.gpu_release import device_pids, wait_for_exiting_neighbours

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_waits_until_the_exiting_neighbour_is_gone_and_ignores_itself():
    clock = Clock()
    gone_at = {11: 1.5}  # pid 11 tears down for 1.5 s; pid 10 (me) and 12 are alive
    waited, stuck = wait_for_exiting_neighbours(
        lambda: [10, 11, 12], timeout_s=30, poll_s=0.1, me=10,
        tearing_down=lambda pid: pid in (10, 11) and clock.now < gone_at.get(pid, 1e9),
        clock=clock, sleep=clock.sleep)
    assert stuck == []
    assert 1.5 <= waited < 1.7


def test_gives_up_after_the_timeout_and_names_what_still_exits():
    clock = Clock()
    waited, stuck = wait_for_exiting_neighbours(lambda: [7], timeout_s=2.0, poll_s=0.5, me=1,
                                                tearing_down=lambda pid: True, clock=clock, sleep=clock.sleep)
    assert stuck == [7] and waited == pytest.approx(2.0)


def test_no_gpu_process_list_means_no_wait():
    waited, stuck = wait_for_exiting_neighbours(lambda: None, timeout_s=5, tearing_down=lambda pid: True)
    assert (stuck, waited < 0.5) == ([], True)


def test_a_live_process_and_a_zombie_are_not_tearing_down():
    """Real processes: alive -> no; killed and not reaped (a zombie: its memory is already
    released) -> no; reaped -> no (nothing to read)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not is_tearing_down(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 20
        while open(f"/proc/{proc.pid}/stat").read().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not is_tearing_down(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert not is_tearing_down(proc.pid)


class FakeNVML:
    """The pynvml calls device_pids makes, counted; ``procs``: the PIDs on the GPU."""

    def __init__(self, procs=(), *, init_error=None, lookup_error=None, list_error=None):
        self.procs, self.init_error, self.lookup_error, self.list_error = list(procs), init_error, lookup_error, list_error
        self.inits = self.shutdowns = self.listings = 0
        self.uuids = []

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        assert self.inits > self.shutdowns, "NVML used while not initialised"
        if self.lookup_error:
            raise self.lookup_error
        self.uuids.append(uuid)
        return ("handle", uuid)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        assert self.inits > self.shutdowns, "NVML used while not initialised"
        assert handle == ("handle", "GPU-fake")
        self.listings += 1
        if self.list_error:
            raise self.list_error
        return [SimpleNamespace(pid=p) for p in self.procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []


def test_nvml_is_initialised_once_per_wait_not_per_poll():
    clock = Clock()
    nvml = FakeNVML([10, 11, 12])
    with device_pids("cuda:0", nvml=nvml, uuid_of=lambda d: "GPU-fake") as pids:
        waited, stuck = wait_for_exiting_neighbours(
            pids, timeout_s=30, poll_s=0.1, me=10,
            tearing_down=lambda pid: pid == 11 and clock.now < 1.5, clock=clock, sleep=clock.sleep)
        assert (nvml.inits, nvml.shutdowns) == (1, 0)
    assert stuck == [] and 1.5 <= waited < 1.7
    assert nvml.listings >= 15  # one process list per 0.1 s poll ...
    assert (nvml.inits, nvml.shutdowns, nvml.uuids) == (1, 1, ["GPU-fake"])  # ... one NVML session


def test_no_nvml_means_no_wait_and_no_crash():
    nvml = FakeNVML([11], init_error=RuntimeError("NVML Shared Library Not Found"))
    with device_pids("cuda:0", nvml=nvml, uuid_of=lambda d: "GPU-fake") as pids:
        waited, stuck = wait_for_exiting_neighbours(pids, timeout_s=5, me=1, tearing_down=lambda pid: True)
    assert (stuck, waited < 0.5) == ([], True)
    assert (nvml.inits, nvml.shutdowns, nvml.listings) == (1, 0, 0)


@pytest.mark.parametrize("failure", ["uuid", "lookup", "listing"])
def test_an_unreadable_device_means_no_wait_and_nvml_is_shut_down(failure):
    nvml = FakeNVML([11], lookup_error=RuntimeError("Not Found") if failure == "lookup" else None,
                    list_error=RuntimeError("Not Supported") if failure == "listing" else None)

    def uuid_of(device):
        if failure == "uuid":
            raise RuntimeError("no CUDA GPUs are available")
        return "GPU-fake"

    with device_pids("cuda:0", nvml=nvml, uuid_of=uuid_of) as pids:
        assert pids() is None
        waited, stuck = wait_for_exiting_neighbours(pids, timeout_s=5, me=1, tearing_down=lambda pid: True)
    assert (stuck, waited < 0.5) == ([], True)
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_nvml_is_shut_down_when_the_wait_raises():
    nvml = FakeNVML([11])
    with pytest.raises(KeyboardInterrupt):
        with device_pids("cuda:0", nvml=nvml, uuid_of=lambda d: "GPU-fake") as pids:
            assert pids() == [11]
            raise KeyboardInterrupt
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_device_pids_on_this_host_is_a_list_with_a_gpu_else_none():
    """The real pynvml and torch: no GPU or no driver reads as None, never a crash."""
    import torch

    with device_pids(torch.device("cuda", 0)) as pids:
        listed = pids()
    if torch.cuda.is_available():
        assert isinstance(listed, list)
    else:
        assert listed is None
