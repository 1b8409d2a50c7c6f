"""End to end (issue #20): a SIGSTOPped rank of a dp2 x pp2 job. Before the health loop kills
it, every node is asked for PyTorch Flight Recorder dumps; the waiting ranks' dumps (the
stopped one cannot answer) name the stopped rank and the collective they wait in, in the
hang event, and ``tenax diagnose`` shows the same and writes the dumps for the standard
analyzer."""

from __future__ import annotations

import pickle

import psutil
import pytest

from tests.helpers.health_e2e_helpers import chaos, cluster_with_env, job_events
from tests.e2e.test_e2e_cluster import alive, job_file, submit, tenax, wait_job_step, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_hang_event_names_the_stopped_rank_and_the_collective_from_flight_recorder_dumps(tmp_path):
    with cluster_with_env(tmp_path, {}) as info:
        job_id = submit(info, job_file(tmp_path, steps=400))
        job = wait_job_step(info, job_id, 4)
        victim = next(w for w in job["workers"] if w["rank"] == 1)
        chaos(info, "hang", "--job", job_id, "--rank", "1")
        wait_until(lambda: psutil.Process(victim["pid"]).status() == psutil.STATUS_STOPPED, 5,
                   "the victim to be stopped", interval_s=0.05)
        wait_until(lambda: not alive(victim["pid"]), 30, "the hung worker to be killed", interval_s=0.1)

        events = job_events(info, job_id, "hang")
        assert events, "no hang event"
        event = events[0]
        finding = event["evidence"]["flight_recorder"]
        print("hang event:", event["decision"])
        assert "flight recorder" in event["decision"], event  # the finding is in the decision too
        assert event["ranks"] == [1]
        assert finding["behind"] == [1], finding
        assert finding["silent"] == [1], finding  # a stopped process cannot dump itself
        # the waiting ranks: each names what it waits in, and who for
        waits = {w["rank"]: w for w in finding["waits"]}
        assert set(waits) == {0, 2, 3}, finding
        print("waits:", finding["waits"])
        for w in waits.values():
            if w["source"] == "flight-recorder":  # a collective the recorder saw, on a group with a rank behind
                assert w["op"].startswith("gloo:") and w["seq"] > 0, w
                assert w["waiting_for"] and set(w["waiting_for"]) <= set(w["group_ranks"]) - {w["rank"]}, w
            else:  # gloo records no point-to-point ops in torch 2.13: the worker's own stack says what it waits in
                assert w["source"] == "worker-stack" and w["op"], w
        # the other data-parallel replica runs on until its gradient collective with rank 1: the
        # recorder names that collective, its group and sequence number
        assert any(w["source"] == "flight-recorder" and w["waiting_for"] == [1] and 1 in w["group_ranks"]
                   for w in waits.values()), finding

        out = tenax("diagnose", job_id, "--etcd", info["etcd"], "--out", str(tmp_path / "fr"), home=info["home"])
        print(out.stdout)
        assert "rank [1] behind" in out.stdout or "ranks [1] behind" in out.stdout or "[1] behind" in out.stdout
        dumps = sorted(p.name for p in (tmp_path / "fr").iterdir())
        assert dumps == ["fr_rank0", "fr_rank2", "fr_rank3"], dumps
        dump = pickle.loads((tmp_path / "fr" / "fr_rank0").read_bytes())
        assert {"entries", "version", "pg_config"} <= set(dump)
