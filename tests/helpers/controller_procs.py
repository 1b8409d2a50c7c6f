"""Helpers for tests that run controller replicas as real processes (own process group, always killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ControllerProc:
    def __init__(self, etcd_url: str, replica_id: str, log_dir: Path, ttl_s: int = 2) -> None:
        self.id = replica_id
        self.log_path = log_dir / f"controller-{replica_id}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "controller", "--etcd", etcd_url, "--id", replica_id,
             "--lease-ttl", str(ttl_s), "--metrics-port", "0", "--tls", "plaintext", "--no-auth"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
        )
        self.info = self._read_banner(timeout_s=30)
        self.address: str = self.info["controller"]

    def _read_banner(self, timeout_s: float) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
            if self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"controller {self.id} did not start; log:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (no chance to revoke its lease)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self._log.close()


def run_cli(args: list[str], *, timeout_s: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("TENAX_CONTROLLER", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env=full_env, start_new_session=True)
