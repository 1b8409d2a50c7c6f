"""agent/chaos.py: a kill carries its root cause (and what the agent saw: SIGSTOP)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from agent.chaos import kill_cause, process_stopped


def test_kill_cause_adds_what_the_agent_saw():
    assert kill_cause("hang: rank 1 made no progress for 4.1 s", stopped=True) == \
        "hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP; killed"
    assert kill_cause("hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP", stopped=True) == \
        "hang: rank 1 made no progress for 4.1 s, stopped by SIGSTOP; killed"
    assert kill_cause("", stopped=False) == "kill requested; killed"


def test_process_stopped_sees_a_real_sigstop():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not process_stopped(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not process_stopped(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait(5)
    assert not process_stopped(proc.pid)
