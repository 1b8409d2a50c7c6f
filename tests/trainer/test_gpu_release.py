"""A recovering rank waits for processes still exiting on its GPU (trainer/gpu_release.py)."""

import subprocess
import sys
import time

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


def test_device_pids_without_a_gpu_is_none_not_a_crash():
    import torch

    if torch.cuda.is_available():
        assert isinstance(device_pids(torch.device("cuda", 0)), list)
    else:
        assert device_pids(torch.device("cuda", 0)) is None
