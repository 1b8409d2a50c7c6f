"""cli/local.py without a cluster: state file, settings, process stopping."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cli.local import (LocalClusterSettings, _process_key, local_cluster_state,
                              stop_processes)


def test_local_cluster_state_reads_the_state_file_or_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TENAX_HOME", str(tmp_path))
    assert local_cluster_state() is None
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "cluster.json").write_text("{broken")
    assert local_cluster_state() is None
    record = {"controller": "127.0.0.1:1", "controllers": ["127.0.0.1:1"], "etcd": "http://127.0.0.1:2"}
    (tmp_path / "local" / "cluster.json").write_text(json.dumps(record))
    assert local_cluster_state() == record
    assert local_cluster_state(tmp_path / "elsewhere") is None


def test_settings_refuse_bad_values(tmp_path):
    assert LocalClusterSettings(state_dir=tmp_path).validate().agents == 2
    for bad, flag in ((dict(agents=-1), "--agents"), (dict(slots=0), "--slots"),
                      (dict(controllers=0), "--controllers"), (dict(lease_ttl_s=1), "--lease-ttl")):
        with pytest.raises(ValueError, match=flag):
            LocalClusterSettings(state_dir=tmp_path, **bad).validate()


def test_stop_processes_terms_then_kills_and_spares_recycled_pids():
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); "
                                 "time.sleep(60)"], stdout=subprocess.PIPE, start_new_session=True)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        stubborn.stdout.readline()  # its SIGTERM handler is installed
        entries = [_process_key(stubborn.pid), _process_key(polite.pid)]
        recycled = dict(_process_key(polite.pid), started=1.0)  # same pid, another start time
        t0 = time.monotonic()
        stop_processes([recycled], grace_s=0.5)
        assert polite.poll() is None  # not ours: untouched
        stop_processes(entries, grace_s=0.5)
        assert stubborn.wait(5) == -9 and polite.wait(5) == -15
        assert time.monotonic() - t0 < 3
    finally:
        for proc in (stubborn, polite):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


