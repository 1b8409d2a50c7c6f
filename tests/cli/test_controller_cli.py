"""The `tenax` client commands against a real controller process and etcd (agents simulated)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from common.etcd import Etcd
from protos.keys import Keys
from protos.records import MetricsBatch, NodeRecord, ProgressRecord, StepRecord, WorkerStatusRecord
from tests.conftest import run_async
from tests.helpers.controller_procs import REPO, ControllerProc, run_cli

pytestmark = pytest.mark.timeout(150)
KEYS = Keys()

GOOD = """\
name: cli-demo
steps: 3
global_batch_size: 4
micro_batch_size: 2
model: {layers: 2, d_model: 16, heads: 2}
parallelism: {dp: 2, pp: 1}
resources: {workers: 2}
"""


class FakeAgentLogs(http.server.BaseHTTPRequestHandler):
    """Serves GET /logs/<job>/<rank>?offset=N like the agent's endpoint."""

    body = b"line one\nline two\n"

    def do_GET(self):  # noqa: N802 (http.server API)
        path, _, query = self.path.partition("?")
        offset = int(query.partition("=")[2] or 0)
        if not path.startswith("/logs/"):
            self.send_response(404)
            self.end_headers()
            return
        data = self.body[offset:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


async def _put_node(etcd_url: str, address: str) -> None:
    async with Etcd(etcd_url) as etcd:
        lease = await etcd.grant_lease(600)
        await etcd.put(KEYS.node("n1"), NodeRecord(id="n1", slots=2, address=address,
                                                   store_address="127.0.0.1:1").to_json(), lease=lease)


async def _run_workers(etcd_url: str, job_id: str, exit_code: int) -> None:
    async with Etcd(etcd_url) as etcd:
        for rank in range(2):
            await etcd.put(KEYS.job_worker(job_id, rank), WorkerStatusRecord(
                rank=rank, node="n1", slot=rank, pid=4242 + rank, state="RUNNING", generation=1).to_json())
        for step in (1, 2, 3):
            await etcd.put(KEYS.job_progress_rank(job_id, 0), ProgressRecord(
                step=step, time=time.time(), loss=5.0 - step, tokens_per_s=321.0, generation=1,
                step_time_s=0.1).to_json())
            await asyncio.sleep(0.2)
        await etcd.put(KEYS.job_metrics_batch(job_id, 1), MetricsBatch(steps=tuple(
            StepRecord(step=s, loss=5.0 - s, generation=1, time=100.0 + s) for s in (1, 2, 3))).to_json())
        for rank in range(2):
            await etcd.put(KEYS.job_worker(job_id, rank), WorkerStatusRecord(
                rank=rank, node="n1", slot=rank, pid=4242 + rank, state="EXITED", exit_code=exit_code,
                generation=1).to_json())


def _job_id_from(text: str) -> str:
    for word in text.split():
        if word.startswith("cli-demo-"):
            return word
    raise AssertionError(f"no job id in {text!r}")


def test_cli_end_to_end_with_simulated_agent(etcd_url, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAgentLogs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctl = None
    waiter = None
    try:
        ctl = ControllerProc(etcd_url, "cli", tmp_path)
        env = {"TENAX_CONTROLLER": ctl.address}
        plain = ["--plaintext"]  # the test controller serves plaintext, asked for explicitly
        run_async(_put_node(etcd_url, f"127.0.0.1:{server.server_address[1]}"), 20)

        out = run_cli(["nodes", "--json", *plain], env=env)
        assert out.returncode == 0, out.stderr
        nodes = json.loads(out.stdout)
        assert [(n["id"], n["state"], n["slots"], n["used_slots"], n["condition"]) for n in nodes] == [
            ("n1", "READY", 2, 0, "HEALTHY")]

        bad = tmp_path / "bad.yaml"
        bad.write_text(GOOD.replace("layers: 2", "layers: 2, flavour: spicy"))
        out = run_cli(["submit", str(bad), *plain], env=env)
        assert out.returncode == 1 and "model.flavour" in out.stderr and "Traceback" not in out.stderr

        good = tmp_path / "good.yaml"
        good.write_text(GOOD)
        waiter = subprocess.Popen([sys.executable, "-m", "cli.main", "submit", str(good), "--wait", *plain],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **env}, start_new_session=True)
        first = waiter.stdout.readline()
        job_id = _job_id_from(first)
        run_async(_run_workers(etcd_url, job_id, exit_code=0), 30)
        stdout, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, stderr
        assert "step 3/3" in stdout and "SUCCEEDED" in stdout and "tok/s" in stdout and "ETA" in stdout

        out = run_cli(["job", job_id, "--json", *plain], env=env)
        assert out.returncode == 0, out.stderr
        rec = json.loads(out.stdout)
        assert rec["id"] == job_id and rec["phase"] == "SUCCEEDED" and rec["step"] == 3
        assert rec["loss"] == pytest.approx(2.0) and rec["generation"] == 1
        assert rec["layout"] == {"dp": 2, "pp": 1, "zero_stage": 0} and rec["recoveries"] == []
        assert [(w["rank"], w["node"], w["slot"], w["pid"], w["state"]) for w in rec["workers"]] == [
            (0, "n1", 0, 4242, "EXITED"), (1, "n1", 1, 4243, "EXITED")]

        out = run_cli(["job", job_id, "--metrics", *plain], env=env)
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(m["step"], m["loss"], m["generation"], m["time"]) for m in lines] == [
            (1, 4.0, 1, 101.0), (2, 3.0, 1, 102.0), (3, 2.0, 1, 103.0)]

        out = run_cli(["logs", job_id, "--rank", "1", *plain], env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "line one\nline two\n"

        out = run_cli(["jobs", *plain], env=env)
        assert job_id in out.stdout and "SUCCEEDED" in out.stdout

        for action, state in (("cordon", "CORDONED"), ("uncordon", "READY"), ("drain", "CORDONED")):
            out = run_cli(["nodes", action, "n1", "--json", *plain], env=env)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)[0]["state"] == state
        out = run_cli(["uncordon", "n1", "--json", *plain], env=env)
        assert json.loads(out.stdout)[0]["state"] == "READY"

        # a second job is cancelled from the CLI while another CLI waits for it: that one exits 1
        waiter = subprocess.Popen([sys.executable, "-m", "cli.main", "submit", str(good), "--wait", *plain],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **env}, start_new_session=True)
        second = _job_id_from(waiter.stdout.readline())
        out = run_cli(["cancel", second, *plain], env=env)
        assert out.returncode == 0 and "cancel requested" in out.stdout
        stdout, stderr = waiter.communicate(timeout=30)
        assert waiter.returncode == 1 and f"job {second} CANCELLED" in stdout, stderr

        out = run_cli(["job", "no-such-job", *plain], env=env)
        assert out.returncode == 1
        # (a plaintext warning line may come first)
        assert out.stderr.strip().splitlines()[-1] == "tenax: NOT_FOUND: job 'no-such-job' not found"

        # a controller that is not there: one clear line, non-zero, no traceback
        out = run_cli(["jobs", "--controller", "127.0.0.1:1", "--timeout", "2", *plain])
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("tenax: UNAVAILABLE")
    finally:
        if waiter and waiter.poll() is None:
            os.killpg(waiter.pid, signal.SIGKILL)
            waiter.wait(timeout=10)
        if ctl:
            ctl.kill()
        server.shutdown()
