"""End to end: etcd is killed -9 mid-job for longer than the hang floor but shorter than the
leases. The workers never wait for etcd and keep training; the leader keeps its lease and its
health loop, whose mirror holds the telemetry of before the outage. That frozen telemetry is
not the ranks' silence: no hang is declared, no rank is killed, no plan changes
(controller/health_loop.py ``telemetry_since``)."""

from __future__ import annotations

import time

import pytest

from common.embedded_etcd import start_etcd
from tests.e2e.test_e2e_cluster import job_file, job_json, submit, wait_job_done, wait_job_step
from tests.helpers.health_e2e_helpers import cluster_with_env, get_job, job_events

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HANG_FLOOR_S = 4
"""The hang floor of the fast detection flags (tests/helpers/health_e2e_helpers.py)."""
LEASE_TTL_S = 15
"""Node and leader leases: longer than the outage, so nobody is re-elected or re-registered."""
OUTAGE_S = 7
"""How long etcd stays away (> the floor, < the leases)."""


def test_an_etcd_outage_shorter_than_the_leases_is_not_a_hang(tmp_path):
    etcd = start_etcd(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log")
    restarted = None
    try:
        with cluster_with_env(tmp_path, {}, etcd=etcd.url, lease_ttl_s=LEASE_TTL_S) as info:
            job_id = submit(info, job_file(tmp_path, steps=400))
            job = wait_job_step(info, job_id, 5)
            pids = {w["rank"]: w["pid"] for w in job["workers"]}
            etcd.kill()
            time.sleep(OUTAGE_S)
            restarted = start_etcd(etcd.data_dir, client_port=etcd.client_port, peer_port=etcd.peer_port,
                                   log_path=tmp_path / "etcd-2.log")
            back = time.monotonic()
            job = wait_job_step(info, job_id, job["step"] + 1)
            assert job["phase"] == "RUNNING", job  # still training when the mirror reloads
            # the window in which stale telemetry would have been judged: a floor past the reload
            while time.monotonic() - back < HANG_FLOOR_S + 4:
                assert not job_events(info, job_id, "hang"), "an etcd outage was taken for a hang"
                time.sleep(0.5)
            done = wait_job_done(info, job_id, timeout_s=150)
            assert done["phase"] == "SUCCEEDED", (done["message"], done["workers"])
            assert not job_events(info, job_id, "hang")
            status = get_job(info, job_id).status
            assert status.generation == 1 and not status.recoveries, status.recoveries
            assert {w["rank"]: w["pid"] for w in job_json(info, job_id)["workers"]} == pids
    finally:
        etcd.kill()
        if restarted:
            restarted.kill()
