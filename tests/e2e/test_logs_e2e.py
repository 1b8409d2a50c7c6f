"""End to end: logs by worker process. A worker interrupted mid-run (its traceback in its log)
is replaced by a re-plan; `tenax logs --rank R --generation 1` still fetches the failed
process's traceback from its agent, `--node/--slot` and `--all` find processes, and the
agent's /logs refuses a request without a token (401) and bad input (4xx, not a traceback)."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request

import pytest

from tests.e2e.test_e2e_cluster import local_cluster, job_file, nodes, submit, tenax, wait_job_done, wait_job_step
from tests.helpers.health_e2e_helpers import get_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def http_status(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_a_failed_workers_traceback_is_fetched_after_the_replan(tmp_path):
    with local_cluster(tmp_path) as info:
        job_id = submit(info, job_file(tmp_path, steps=40))
        job = wait_job_step(info, job_id, 5)
        victim = next(w for w in job["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGINT)  # KeyboardInterrupt: a traceback in its log, then it dies
        done = wait_job_done(info, job_id, timeout_s=180)
        assert done["phase"] == "SUCCEEDED", done
        status = get_job(info, job_id).status
        assert status.generation >= 2 and status.recoveries
        cause = status.recoveries[0].cause
        assert cause.startswith(f"worker-failed: rank 1 on {victim['node']}") and \
            cause.endswith("last error: KeyboardInterrupt"), cause

        run = ("--controller", info["controller"])
        got = tenax("logs", job_id, "--rank", "1", "--generation", "1", *run, home=info["home"])
        assert "--- tenax: rank 1 generation 1" in got.stdout and "KeyboardInterrupt" in got.stdout, got.stdout[-2000:]
        assert "Traceback (most recent call last)" in got.stdout
        assert f"pid {victim['pid']}" in got.stderr and "FAILED" in got.stderr, got.stderr

        by_slot = tenax("logs", job_id, "--node", victim["node"], "--slot", str(victim["slot"]), *run,
                        home=info["home"])
        assert "KeyboardInterrupt" in by_slot.stdout
        every = tenax("logs", job_id, "--all", *run, home=info["home"]).stdout
        headers = [line for line in every.splitlines() if line.startswith("==> ")]
        assert len(headers) >= 4 and any(f"pid {victim['pid']}" in h for h in headers), headers
        missing = tenax("logs", job_id, "--rank", "1", "--generation", "99", *run, home=info["home"], check=False)
        assert missing.returncode == 1 and "no log of a rank 1 in generation 99" in missing.stderr

        address = nodes(info)[victim["node"]].address
        token = open(info["security"]["token_file"]).read().strip()
        assert http_status(f"http://{address}/logs/{job_id}")[0] == 401
        assert http_status(f"http://{address}/logs/{job_id}", "tnx.0000000000000000." + "A" * 43)[0] == 401
        assert http_status(f"http://{address}/metrics")[0] == 200  # scrapers need no token
        code, body = http_status(f"http://{address}/logs/{job_id}", token)
        assert code == 200 and f'"pid": {victim["pid"]}' in body
        for bad in (f"/logs/{job_id}/" + "9" * 5000, "/logs/j%C3%B6b/1", f"/logs/{job_id}/1?offset=" + "1" * 5000,
                    f"/logs/{job_id}/..%2f..%2fetc%2fpasswd"):
            code, body = http_status(f"http://{address}{bad}", token)
            assert 400 <= code < 500 and "Traceback" not in body, (bad[:60], code, body)
