"""Shared helpers of the detection/chaos end-to-end tests (a live local cluster)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from pathlib import Path

from cli.local import controller_channel, local_cluster_state
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from tests.e2e.test_e2e_cluster import KEYS, etcd_read, job_json, local_cluster, tenax

FAST_DETECTION_ARGS = (
    "--hang-floor-s=4",  # the default 10 s floor is for real clusters
    "--hang-k=5",
    "--health-interval-s=0.3",
)
"""`tenax controller` flags (through `tenax up --controller-arg`) for detection within a test's time."""


@contextlib.contextmanager
def cluster_with_env(tmp_path: Path, env: dict[str, str], *, controller_args=FAST_DETECTION_ARGS, **kwargs):
    """``local_cluster`` whose agents (and so workers) see ``env``, and whose controllers get
    ``controller_args``."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with local_cluster(tmp_path, controller_args=controller_args, **kwargs) as info:
            yield info
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def chaos(info: dict, *argv: str) -> dict:
    out = tenax("chaos", *argv, "--json", "--controller", info["controller"], home=info["home"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def chaos_rpc(info: dict, **fields) -> pb.ChaosResponse:
    """ChaosService.Inject straight from the test process: no CLI process stealing CPU
    from the workers while a test measures their speed."""
    with controller_channel(info["controller"], info["security"]) as channel:
        return pb_grpc.ChaosServiceStub(channel).Inject(pb.ChaosRequest(**fields), timeout=10)


def get_job(info: dict, job_id: str) -> pb.Job:
    with controller_channel(info["controller"], info["security"]) as channel:
        return pb_grpc.JobServiceStub(channel).GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)


def controller_metrics_address(info: dict) -> str:
    state = local_cluster_state(Path(info["home"]) / "local") or {}
    return state["controller_metrics"][0]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return reply.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly these label values (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if found == want:
            return float(value)
    return 0.0


def metrics_lines(info: dict, node: str, job_id: str, rank: int, generation: int = 1) -> list[dict]:
    """The metrics lines of the worker that ``node``'s agent started as ``rank`` in plan ``generation``
    (a worker started after the first generation has its files suffixed ``-g<generation>``)."""
    name = f"rank-{rank}" + (f"-g{generation}" if generation > 1 else "")
    path = Path(info["state_dir"]) / "agents" / node / "jobs" / job_id / f"{name}.metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def job_events(info: dict, job_id: str, kind: str) -> list[dict]:
    """The ``data`` of the job's events of ``kind`` in etcd (``Keys.job_events``), oldest first."""
    kvs = etcd_read(info["etcd"], lambda e: e.get_prefix(KEYS.job_events(job_id)))
    out = []
    for kv in sorted(kvs, key=lambda kv: kv.key):
        record = json.loads(kv.value)
        if record.get("kind") == kind:
            out.append(record["data"])
    return out


def wait_rarely(info: dict, job_id: str, done, timeout_s: float, interval_s: float = 2.0) -> dict:
    """Poll the job (a CLI process per poll) every ``interval_s`` until ``done(job)``; fail on a
    FAILED/CANCELLED job or after ``timeout_s``. Rare polls keep the host's cores for the workers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = job_json(info, job_id)
        assert job["phase"] not in ("FAILED", "CANCELLED"), job
        if done(job):
            return job
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for job {job_id}")
