"""A worker's exit is seen when the kernel begins it (its lifeline closes), not when its
teardown ends (agent/lifeline.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from agent.lifeline import open_lifeline
from common.procexit import dying_returncode, is_tearing_down, parse_exit
from agent.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _wait_state(pid: int, state: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        if text[text.rindex(")") + 2] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never reached state {state}")


def test_parse_exit_reads_state_flags_and_status():
    def stat(state: str, flags: int, status: int) -> str:
        rest = [state] + ["0"] * 5 + [str(flags)] + ["0"] * 42 + [str(status)] + ["0"]
        return "123 (python3 (x) y) " + " ".join(rest)

    assert parse_exit(stat("S", 0x400000, 0)) is None           # alive
    assert parse_exit(stat("R", 0x400004, 9)) == -9              # in do_exit, SIGKILL
    assert parse_exit(stat("Z", 0x0, 3 << 8)) == 3               # exited with code 3
    assert parse_exit(stat("D", 0x4, 0)) == 0                    # exiting with code 0


def test_a_killed_unreaped_process_reads_as_dying_with_its_signal():
    proc = subprocess.Popen(SLEEPER)
    try:
        assert dying_returncode(proc.pid) is None
        proc.send_signal(signal.SIGKILL)
        _wait_state(proc.pid, "Z")  # not reaped: waitpid has not been called
        assert dying_returncode(proc.pid) == -9
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert dying_returncode(proc.pid) is None  # reaped: nothing to read


def test_exit_code_of_a_normal_exit():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    try:
        _wait_state(proc.pid, "Z")
        assert dying_returncode(proc.pid) == 7
    finally:
        proc.wait(timeout=10)


def test_supervisor_reports_the_exit_before_the_reap():
    """The reap is held back (a stand-in for a GPU worker's seconds-long teardown); the exit
    is still seen at once, from the lifeline and /proc, with its signal."""
    r, w = open_lifeline()
    proc = subprocess.Popen(SLEEPER, pass_fds=(w,))
    os.close(w)

    async def slow_wait():
        await asyncio.sleep(30)
        return proc.wait(timeout=5)

    async def main():
        worker = SimpleNamespace(proc=SimpleNamespace(wait=slow_wait), lifeline=r, pid=proc.pid, slot=0, reaped=None)
        host = SimpleNamespace(_reaping={})
        task = asyncio.ensure_future(Supervisor._first_sign_of_exit(host, worker))
        await asyncio.sleep(0.3)
        assert not task.done()  # alive: nothing to report
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        code = await asyncio.wait_for(task, 10)
        seen = time.monotonic() - killed
        assert worker.lifeline is None and not worker.reaped.done()  # still to be reaped
        worker.reaped.cancel()
        return code, seen

    try:
        code, seen = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert code == -9
    assert seen < 10


def test_a_closed_lifeline_without_an_exit_waits_for_the_reap():
    """A worker that closes its lifeline itself is not reported dead while it runs."""
    r, w = open_lifeline()
    proc = subprocess.Popen([sys.executable, "-c", f"import os, time; os.close({w}); time.sleep(1.0)"],
                            pass_fds=(w,))
    os.close(w)

    async def wait():
        while proc.poll() is None:
            await asyncio.sleep(0.02)
        return proc.returncode

    async def main():
        worker = SimpleNamespace(proc=SimpleNamespace(wait=wait), lifeline=r, pid=proc.pid, slot=0, reaped=None)
        started = time.monotonic()
        code = await asyncio.wait_for(Supervisor._first_sign_of_exit(SimpleNamespace(_reaping={}), worker), 20)
        return code, time.monotonic() - started

    code, took = asyncio.run(main())
    assert code == 0
    assert took >= 0.9  # it waited for the process to end
