"""Test-side helpers for multi-process tests: a store, worker processes, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

SCRIPT = Path(__file__).resolve().parent / "dist_scenarios.py"


class Workers:
    """Worker processes of one scenario around a TCPStore served by the test."""

    def __init__(self, scenario: str, world: int, out: Path, arg: str = "") -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        self.out = out
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen([sys.executable, str(SCRIPT), scenario, str(r), str(world), str(self.store.port),
                              str(out), arg], env=env, stdout=open(out / f"log-{r}.txt", "w"),
                             stderr=subprocess.STDOUT)
            for r in range(world)
        ]

    def wait_key(self, key: str, timeout_s: float = 60.0) -> str:
        self.store.wait([key], timedelta(seconds=timeout_s))
        return self.store.get(key).decode()

    def signal(self, rank: int, sig: int) -> float:
        self.procs[rank].send_signal(sig)
        return time.time()

    def wait_exit(self, ranks, timeout_s: float = 60.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for r in ranks:
            codes[r] = self.procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
        return codes

    def result(self, rank: int) -> dict:
        return json.loads((self.out / f"result-{rank}.json").read_text())

    def log(self, rank: int) -> str:
        path = self.out / f"log-{rank}.txt"
        return path.read_text()[-3000:] if path.exists() else ""

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)  # also ends a SIGSTOPped process
                p.wait(timeout=10)
