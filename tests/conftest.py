"""Shared fixtures: a real etcd server on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.embedded_etcd import start_etcd  # noqa: E402


@pytest.fixture
def etcd_server(tmp_path):
    """A fresh etcd per test; killed afterwards whatever happens."""
    server = start_etcd(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def etcd_url(etcd_server) -> str:
    return etcd_server.url


def run_async(coro, timeout_s: float = 60.0):
    """Run a coroutine with a hard timeout (tests never hang)."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _no_gpu_env(monkeypatch):
    # Tests run on CPU unless a test opts in explicitly.
    monkeypatch.setenv("TENAX_TEST", "1")
    yield
