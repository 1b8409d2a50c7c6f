"""End to end: `tenax demo` (what `make demo` runs) kills a worker mid-run and shows the
recovery live (detection, new layout, MTTR, steps lost, loss on track), then the worker
table and the timeline of events."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli.demo import loss_on_track
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_loss_on_track_compares_the_steps_around_the_kill():
    assert loss_on_track([3.0, 2.9], [2.0, 1.9])[0]
    assert not loss_on_track([2.0, 2.0], [3.0, 3.0])[0]
    assert not loss_on_track([], [1.0])[0]


def test_demo_kills_a_worker_and_shows_the_recovery(tmp_path):
    env = {**os.environ, "TENAX_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("TENAX_CONTROLLER", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", "demo"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=280)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    lines = out.splitlines()
    kill = next(i for i, line in enumerate(lines) if "killing rank 1" in line)
    recovered = next(i for i, line in enumerate(lines) if line.startswith("demo | recovered in"))
    assert kill < recovered
    live = "\n".join(lines[kill:recovered])
    assert "event worker-exit" in live and "event plan" in live and "plan generation 2" in live
    assert "chaos: kill of rank 1 requested by" in lines[recovered]
    detail = "\n".join(lines[recovered:recovered + 3])
    assert "layout dp=2·pp=2 -> dp=" in detail and "detection " in detail and "MTTR " in detail
    assert "steps lost " in detail
    assert any("loss: " in line and "on track" in line and "NOT" not in line for line in lines)
    table = lines.index(next(line for line in lines if line.startswith("RANK NODE")))
    rows = [line for line in lines[table + 1:] if line.strip() and line.split()[0].isdigit()]
    assert rows and all(row.split()[-1] == "EXITED" for row in rows), lines[table:]
    assert any(line.startswith("events (latest") for line in lines)
    assert any("recovery" in line and "recovered from chaos" in line for line in lines[table:])
    assert any("goodput    ETTR" in line for line in lines)
