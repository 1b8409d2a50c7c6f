"""Issue #18 findings 3 and 4 (and the fuzzing of absurd-but-valid specs) against a real cluster:
`tenax up` with real etcd, controller, agents and trainer workers.

* The agents' rendezvous store listens on the address it is advertised at (loopback under
  `tenax up`), like every other listener, not on every interface.
* ``data.path`` is read only under the agent's ``--data-root``: absolute paths outside it,
  ``..`` and symlinks out of it are refused before any worker starts, and nothing of the
  file's contents reaches a log or a job status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_e2e_cluster import job_file, job_json, local_cluster, submit, tenax
from trainer.data import write_token_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SECRET = "da" * 64  # read as uint16 tokens: 24932 each, the value the old error message quoted


def _wait_phase(info: dict, job_id: str, phases: set[str], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = job_json(info, job_id)
        if job["phase"] in phases:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job['phase']}: {job['message']}"
        time.sleep(0.5)


def _listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            and c.laddr.port == port}


def _job(tmp_path: Path, name: str, **data) -> Path:
    folder = tmp_path / f"job-{name}"
    folder.mkdir()
    return job_file(folder, name=name, steps=3,
                    global_batch_size=4, micro_batch_size=2,
                    model={"arch": "gpt", "layers": 2, "d_model": 16, "heads": 2, "vocab_size": 256, "seq_len": 8,
                           "dropout": 0.0},
                    parallelism={"dp": 1, "pp": 1, "zero_stage": 0}, elastic={"min_workers": 1},
                    resources={"workers": 1, "device": "cpu"}, data={"kind": "tokens", "dtype": "uint16", **data})


def test_store_binds_loopback_and_data_paths_stay_under_data_roots(tmp_path):
    root = tmp_path / "data-root"
    root.mkdir()
    write_token_file(list(b"hello tenax, a small corpus for a tiny model. " * 20), root / "corpus.bin")
    secret = tmp_path / "secret.bin"  # outside the root, like /etc/shadow
    secret.write_text(SECRET)
    (root / "link.bin").symlink_to(secret)
    with local_cluster(tmp_path, agents=1, slots=2, agent_args=[f"--data-root={root}"]) as info:
        nodes = json.loads(tenax("nodes", "--json", "--controller", info["controller"], home=info["home"]).stdout)
        for node in nodes:  # finding 3: the store listens where it is advertised, nowhere else
            host, _, port = node["store_address"].rpartition(":")
            assert host == "127.0.0.1" and _listeners(int(port)) == {"127.0.0.1"}, node

        ok = submit(info, _job(tmp_path, "inside", path="corpus.bin"))  # relative: under the root
        refused = {name: submit(info, _job(tmp_path, name, path=path)) for name, path in (
            ("absolute", str(secret)), ("dotdot", "../secret.bin"), ("symlink", "link.bin"))}
        assert _wait_phase(info, ok, {"SUCCEEDED", "FAILED"})["phase"] == "SUCCEEDED"
        for name, job_id in refused.items():
            job = _wait_phase(info, job_id, {"FAILED"})
            assert "exit code 127" in job["message"], (name, job)  # refused by the agent: never started
        work = info["home"]
        leaked = [p for p in work.rglob("*") if p.is_file() and p.stat().st_size < 10 << 20
                  and not p.is_symlink() and p != secret and (b"24932" in p.read_bytes() or SECRET.encode()
                                                               in p.read_bytes())]
        assert leaked == [], f"secret contents leaked into {leaked}"
        for job_id in refused.values():
            logs = list(work.rglob(f"jobs/{job_id}/rank-*.log"))
            assert logs == [], f"a worker started for a refused data.path: {logs}"
        # finding 11: etcd's data, the cluster's logs and the job logs are their owner's only
        private = [work / "local" / "etcd-data", work / "local" / "logs", work / "local", *work.rglob("agents/*"),
                   *(p for p in work.rglob("jobs/*") if p.is_dir())]
        assert len(private) >= 4 and {p: oct(p.stat().st_mode & 0o777) for p in private if p.stat().st_mode & 0o077} \
            == {}
        statuses = tenax("jobs", "--json", "--controller", info["controller"], home=info["home"]).stdout
        assert "24932" not in statuses and SECRET not in statuses


def test_resolve_data_path_refuses_every_way_out(tmp_path):
    from agent.data_roots import DataPathRefused, resolve_data_path

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.bin").write_bytes(b"\0\0")
    (tmp_path / "outside.bin").write_bytes(b"\0\0")
    (root / "out-link").symlink_to(tmp_path)
    assert resolve_data_path("sub/ok.bin", [root]) == (root / "sub" / "ok.bin").resolve()
    assert resolve_data_path(str(root / "sub" / "ok.bin"), [tmp_path / "elsewhere", root]).name == "ok.bin"
    for path in (str(tmp_path / "outside.bin"), "../outside.bin", "sub/../../outside.bin", "out-link/outside.bin",
                 "/etc/shadow", "sub", "missing.bin", "a\0b"):
        with pytest.raises(DataPathRefused, match=r"^data\.path: "):
            resolve_data_path(path, [root])
    with pytest.raises(DataPathRefused, match="without --data-root"):
        resolve_data_path("sub/ok.bin", [])


def _absurd_but_valid_specs() -> dict[str, dict]:
    """Specs at the upper bounds of common/spec.py (SPEC_UPPER_BOUNDS), each valid, each cheap in
    memory: they must not hurt the controller, the agents, or the jobs that come after them."""
    from common.spec import SPEC_UPPER_BOUNDS as B

    tiny = {"arch": "gpt", "layers": 1, "d_model": 4, "heads": 1, "vocab_size": 2, "seq_len": 1, "dropout": 0.0}

    def spec(name, *, model=None, workers=1, pp=1, **top):
        return {"name": name, "steps": 2, "global_batch_size": workers // pp, "micro_batch_size": 1,
                "model": {**tiny, **(model or {})}, "parallelism": {"dp": workers // pp, "pp": pp, "zero_stage": 0},
                "elastic": {"min_workers": 1}, "resources": {"workers": workers, "device": "cpu"}, **top}

    return {
        "deepest-pipeline": spec("deepest-pipeline", model={"layers": B["model.layers"]}, workers=4, pp=4),
        "more-workers-than-slots": spec("more-workers-than-slots", workers=B["resources.workers"], pp=4,
                                        model={"layers": 4}),
        "largest-vocab": spec("largest-vocab", model={"vocab_size": B["model.vocab_size"]}),
        "largest-seed": spec("largest-seed", seed=B["seed"]),
        "forever": spec("forever", steps=B["steps"], elastic={"min_workers": 1, "checkpoint_every": B["steps"],
                                                                "snapshot_every": str(B["steps"])}),
    }


def test_absurd_but_valid_specs_do_not_hurt_a_cluster_with_agents(tmp_path):
    import grpc
    from google.protobuf import json_format
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cli.local import controller_channel
    from protos import tenax_pb2 as pb
    from protos import tenax_pb2_grpc as pb_grpc

    with local_cluster(tmp_path, agents=2, slots=2,
                       controller_args=["--unplaceable-fail-after-s=5"]) as info:
        with controller_channel(info["controller"], info["security"]) as channel:
            jobs = pb_grpc.JobServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            ids = {}
            for name, data in _absurd_but_valid_specs().items():
                request = pb.SubmitJobRequest(spec=json_format.ParseDict(data, pb.JobSpec()))
                ids[name] = jobs.SubmitJob(request, timeout=30).id
            slowest, deadline = 0.0, time.monotonic() + 150
            while True:
                t0 = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                slowest = max(slowest, time.monotonic() - t0)
                phases = {n: job_json(info, i) for n, i in ids.items()}
                if phases["forever"]["phase"] == "RUNNING" and all(
                        j["phase"] in ("SUCCEEDED", "FAILED") for n, j in phases.items() if n != "forever"):
                    break
                assert time.monotonic() < deadline, {n: (j["phase"], j["message"]) for n, j in phases.items()}
                time.sleep(0.5)
            assert slowest < 2.0, f"the controller answered a health check after {slowest:.1f} s"
            unplaceable = phases["more-workers-than-slots"]
            assert unplaceable["phase"] == "FAILED" and "cannot be placed" in unplaceable["message"]
            assert phases["deepest-pipeline"]["phase"] == "SUCCEEDED", phases["deepest-pipeline"]
            jobs.CancelJob(pb.CancelJobRequest(job_id=ids["forever"]), timeout=30)
            assert _wait_phase(info, ids["forever"], {"CANCELLED"})["phase"] == "CANCELLED"
            nodes = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=30).nodes
            assert len(nodes) == 2 and all(n.state == pb.READY for n in nodes)
            after = submit(info, _job(tmp_path, "after", path="x"))  # no data root: refused, promptly
            assert _wait_phase(info, after, {"FAILED"})["phase"] == "FAILED"
            assert rpc_ok(lambda: jobs.ListJobs(pb.ListJobsRequest(), timeout=30))


def rpc_ok(call) -> bool:
    import grpc

    try:
        call()
    except grpc.RpcError:
        return False
    return True


def test_an_unplaceable_pending_job_does_not_stop_other_jobs_growing(tmp_path):
    """Finding 5: while a job needing more workers than the cluster has slots waited, no job
    could grow (growth yields to PENDING jobs); now only a job the cluster could hold does that."""
    from google.protobuf import json_format

    from cli.local import controller_channel
    from protos import tenax_pb2 as pb
    from protos import tenax_pb2_grpc as pb_grpc

    tiny = {"arch": "gpt", "layers": 2, "d_model": 16, "heads": 2, "vocab_size": 256, "seq_len": 8, "dropout": 0.0}
    unplaceable = {"name": "too-big", "steps": 5, "global_batch_size": 8, "micro_batch_size": 1, "model": tiny,
                   "parallelism": {"dp": 8, "pp": 1}, "resources": {"workers": 8, "device": "cpu"}}
    elastic = {"name": "grows", "steps": 100_000, "global_batch_size": 4, "micro_batch_size": 1, "model": tiny,
               "parallelism": {"dp": 2, "pp": 1}, "resources": {"workers": 2, "device": "cpu"},
               "elastic": {"min_workers": 1, "max_workers": 4, "snapshot_every": "1"}}
    with local_cluster(tmp_path, agents=2, slots=2) as info:
        with controller_channel(info["controller"], info["security"]) as channel:
            jobs = pb_grpc.JobServiceStub(channel)

            def submit_spec(data):
                return jobs.SubmitJob(pb.SubmitJobRequest(spec=json_format.ParseDict(data, pb.JobSpec())),
                                      timeout=30).id

            waiting = submit_spec(unplaceable)
            grows = submit_spec(elastic)
            deadline = time.monotonic() + 150
            while len(job_json(info, grows)["workers"]) < 4 or job_json(info, grows)["generation"] < 2:
                if time.monotonic() > deadline:
                    from tests.e2e.test_e2e_elastic import worker_logs

                    events = tenax("events", grows, "--controller", info["controller"], home=info["home"]).stdout
                    raise AssertionError(f"{job_json(info, grows)}\n{job_json(info, waiting)}\n{events}\n"
                                         f"{worker_logs(info, tail_chars=1500)}")
                time.sleep(1.0)
            pending = job_json(info, waiting)
            assert pending["phase"] == "PENDING" and "more than the 4 the cluster has" in pending["message"]
            for job_id in (grows, waiting):
                jobs.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=30)
            _wait_phase(info, grows, {"CANCELLED"})
