"""Issue #18, through the real controller over real gRPC and etcd: spec bounds, plan math off
the event loop, idempotent and atomically limited submits, the SubmitJob audit record, and
UNAVAILABLE (not UNAUTHENTICATED) while etcd is down."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.main import main as tenax
from common.spec import BOUNDED_BY_CHOICES, SPEC_UPPER_BOUNDS, JobSpec, SpecError
from controller.limits import Limits
from controller.retention import RetentionSettings
from controller.security import SecuritySettings
from controller.tls import ensure_dev_pki
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.records import NodeRecord
from tests.helpers.security_helpers import CALL_TIMEOUT_S, rpc_code, start_real_controller, tiny_spec

pytestmark = pytest.mark.timeout(120)


def _api(etcd_url, tmp_path, **security):
    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls(), **security))
    return api


def _jobs(api, name: str, role: str = "submitter") -> pb_grpc.JobServiceStub:
    token = api.tokens.get(name) or api.make_token(name, role)
    return pb_grpc.JobServiceStub(api.channel(token=token))


def _job_ids(api) -> set[str]:
    return {api.keys.parse_job_key(k)[0] for k in api.etcd_keys(api.keys.jobs())}


def _big(**model) -> pb.JobSpec:
    spec = tiny_spec("big")
    spec.model.CopyFrom(pb.ModelSpec(**{"layers": 4, "d_model": 4, "heads": 1, "vocab_size": 2, "seq_len": 1,
                                        **model}))
    return spec


# ------------------------------------------------------------------ finding 5: upper bounds
@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.model.__setattr__("d_model", 10**9), "model.d_model"),
    (lambda s: s.__setattr__("steps", 9 * 10**18), "steps"),
    (lambda s: (s.resources.__setattr__("workers", 2**31 - 1), s.parallelism.__setattr__("dp", 2**31 - 1),
                s.__setattr__("global_batch_size", 2**31 - 1)), "parallelism.dp"),
    (lambda s: s.model.__setattr__("layers", 6000), "model.layers"),
    (lambda s: s.__setattr__("global_batch_size", 2**31 - 1), "global_batch_size"),
    (lambda s: s.model.__setattr__("vocab_size", 2**31 - 1), "model.vocab_size"),
])
def test_absurd_specs_are_refused_naming_the_field(etcd_url, tmp_path, mutate, field):
    api = _api(etcd_url, tmp_path)
    try:
        spec = _big()
        mutate(spec)
        with pytest.raises(grpc.RpcError) as err:
            _jobs(api, "sam").SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details() and "must be <=" in err.value.details()
        assert _job_ids(api) == set()
    finally:
        api.stop()


def test_every_numeric_spec_field_has_an_upper_bound():
    def numeric_fields(obj, path=""):
        for name, value in vars(obj).items():
            dotted = f"{path}{name}"
            if hasattr(value, "__dataclass_fields__"):
                yield from numeric_fields(value, dotted + ".")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield dotted

    unbounded = set(numeric_fields(JobSpec())) - set(SPEC_UPPER_BOUNDS) - set(BOUNDED_BY_CHOICES)
    assert not unbounded, f"numeric spec fields without an upper bound: {sorted(unbounded)}"
    for dotted, bound in SPEC_UPPER_BOUNDS.items():  # each bound is itself reachable
        data: dict = {}
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = bound * 2 + 1
        with pytest.raises(SpecError, match=rf"^{dotted}: "):
            JobSpec.from_dict(data)


# ------------------------------------------------------------------ finding 1: the event loop stays free
def test_largest_valid_specs_never_block_health_checks_or_the_lease(etcd_url, tmp_path):
    api = _api(etcd_url, tmp_path, limits=Limits(max_active_jobs_per_user=100))
    stop = threading.Event()
    latencies: list[float] = []

    def probe():
        with api.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                t0 = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)

    # a node with room for every job: the leader places each one, which is when a plan's
    # layer partition is made (in the event loop, before the fix)
    node = NodeRecord(id="big-node", slots=5 * 64, store_address="127.0.0.1:1")
    api.run(api.etcd.put(api.keys.node(node.id), node.to_json()))
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        sam = _jobs(api, "sam")
        for d_model in (4, 8, 12, 16, 20):  # distinct specs: nothing remembered from the one before
            spec = _big(layers=SPEC_UPPER_BOUNDS["model.layers"], d_model=d_model)
            spec.parallelism.pp = spec.resources.workers = SPEC_UPPER_BOUNDS["parallelism.pp"]
            spec.global_batch_size = 64
            job = sam.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=CALL_TIMEOUT_S)
            assert job.id
        deadline = time.monotonic() + 30
        while len([k for k in api.etcd_keys(api.keys.jobs()) if k.endswith("/plan")]) < 5:
            assert time.monotonic() < deadline, "the leader did not place the jobs"
            time.sleep(0.1)
        assert latencies and max(latencies) < 0.5, f"health check blocked for {max(latencies):.2f} s"
        assert api.run(_still_leading(api))
        assert len(_job_ids(api)) == 5
    finally:
        stop.set()
        prober.join(10)
        api.stop()  # its loops would run on, against an etcd the fixture stops, to pytest's exit


async def _still_leading(api) -> bool:
    kv = await api.etcd.get(api.keys.leader())
    return kv is not None


# ------------------------------------------------------------------ finding 1: idempotent submit
def test_submit_with_a_request_id_never_duplicates(etcd_url, tmp_path):
    api = _api(etcd_url, tmp_path)
    try:
        sam, olga = _jobs(api, "sam"), _jobs(api, "olga")
        request = pb.SubmitJobRequest(spec=tiny_spec("once"), request_id="retry-me-1")
        with ThreadPoolExecutor(8) as pool:  # a client retrying in a hurry (say after UNAVAILABLE)
            ids = set(pool.map(lambda _: sam.SubmitJob(request, timeout=CALL_TIMEOUT_S).id, range(8)))
        assert len(ids) == 1
        assert sam.SubmitJob(request, timeout=CALL_TIMEOUT_S).id in ids
        other = olga.SubmitJob(request, timeout=CALL_TIMEOUT_S).id  # another caller's ids are its own
        assert other not in ids
        assert _job_ids(api) == ids | {other}
        with pytest.raises(grpc.RpcError) as err:
            sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec(), request_id="../x"), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 6: atomic per-user limit
def test_jobs_per_user_limit_holds_under_concurrent_submits(etcd_url, tmp_path):
    api = _api(etcd_url, tmp_path, limits=Limits(max_active_jobs_per_user=5, calls_per_s=1000, burst=1000))
    try:
        sam = _jobs(api, "sam")
        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(lambda i: rpc_code(lambda: sam.SubmitJob(
                pb.SubmitJobRequest(spec=tiny_spec(f"burst-{i}")), timeout=CALL_TIMEOUT_S * 3)), range(30)))
        assert codes.count(grpc.StatusCode.OK) == 5, codes
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(_job_ids(api)) == 5
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 8: audit names the job
def test_submit_audit_record_names_the_job_id(etcd_url, tmp_path):
    api = _api(etcd_url, tmp_path)
    try:
        job = _jobs(api, "sam").SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("audited")), timeout=CALL_TIMEOUT_S)
        records = [r for r in api.audit() if r.method.endswith("/SubmitJob")]
        assert [(r.identity, r.code, r.target) for r in records] == [("sam", "OK", job.id)]
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 9: etcd down
def test_etcd_down_answers_unavailable_not_unauthenticated(etcd_server, tmp_path):
    api = _api(etcd_server.url, tmp_path, token_cache_s=0.0)
    try:
        sam = _jobs(api, "sam")
        assert sam.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S) is not None
        etcd_server.kill()
        for call in (lambda: sam.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S),
                     lambda: sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec()), timeout=CALL_TIMEOUT_S)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 11: nested YAML
def test_deeply_nested_job_file_is_a_clear_error(tmp_path, capsys):
    job = tmp_path / "deep.yaml"
    job.write_text("name: deep\nmodel: " + "[" * 5000 + "1" + "]" * 5000 + "\n")
    assert tenax(["submit", str(job), "--controller", "127.0.0.1:1"]) != 0
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err and "RecursionError" not in err
    shallow = tmp_path / "shallow.yaml"
    shallow.write_text("name: deep\nmodel: " + "[" * 40 + "1" + "]" * 40 + "\n")  # parses, still refused
    assert tenax(["submit", str(shallow), "--controller", "127.0.0.1:1"]) != 0
    assert "nested too deeply" in capsys.readouterr().err


# ------------------------------------------------------------------ finding 11: retention and paging
def _wait_for(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_finished_jobs_expire_after_their_retention(etcd_url, tmp_path):
    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls()),
                                retention=RetentionSettings(finished_job_retention_s=1.0, sweep_interval_s=0.2))
    try:
        sam = _jobs(api, "sam")
        done = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("done"), request_id="r-done"), timeout=CALL_TIMEOUT_S)
        kept = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("kept")), timeout=CALL_TIMEOUT_S)
        sam.CancelJob(pb.CancelJobRequest(job_id=done.id), timeout=CALL_TIMEOUT_S)
        _wait_for(lambda: _job_ids(api) == {kept.id}, "the cancelled job was never deleted")
        assert api.run(api.etcd.get(api.keys.job_owner(done.id))) is None
        assert api.etcd_keys(api.keys.submit_requests()) == []
        assert [j.id for j in sam.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S).jobs] == [kept.id]
        time.sleep(1.5)  # an active job is never deleted, however old
        assert _job_ids(api) == {kept.id}
    finally:
        api.stop()


def test_list_jobs_pages(etcd_url, tmp_path):
    api = _api(etcd_url, tmp_path)
    try:
        sam = _jobs(api, "sam")
        submitted = [sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec(f"p{i}")), timeout=CALL_TIMEOUT_S).id
                     for i in range(7)]
        pages, token = [], ""
        while True:
            reply = sam.ListJobs(pb.ListJobsRequest(page_size=3, page_token=token), timeout=CALL_TIMEOUT_S)
            pages.append([j.id for j in reply.jobs])
            token = reply.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [i for p in pages for i in p] == submitted  # oldest first, nothing twice, nothing lost
        with pytest.raises(grpc.RpcError) as err:
            sam.ListJobs(pb.ListJobsRequest(page_token="garbage"), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details()
        assert len(sam.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S).jobs) == 7  # default page holds all
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 5: a job that can never be placed
def test_unplaceable_job_says_why_then_fails(etcd_url, tmp_path):
    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls()),
                                retention=RetentionSettings(unplaceable_fail_after_s=2.0))
    try:
        node = NodeRecord(id="small", slots=2, store_address="127.0.0.1:1")
        api.run(api.etcd.put(api.keys.node(node.id), node.to_json()))
        sam = _jobs(api, "sam")
        spec = tiny_spec("huge")
        spec.resources.workers = spec.parallelism.dp = 4
        spec.global_batch_size = 4
        job = sam.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=CALL_TIMEOUT_S)

        def status():
            return sam.GetJob(pb.GetJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).status

        _wait_for(lambda: "waiting for 4 free slots, more than the 2 the cluster has" in status().message, "no reason given")
        _wait_for(lambda: status().phase == pb.FAILED, "the unplaceable job never failed")
        assert "cannot be placed" in status().message
    finally:
        api.stop()


# ------------------------------------------------------------------ finding 1: a failover retry of the CLI
def test_cli_submit_retried_on_another_replica_creates_one_job(etcd_url, tmp_path, capsys, monkeypatch):
    """The first replica writes the job and then answers UNAVAILABLE (as the frozen controller
    of finding 1 did); the CLI fails over to the next replica with the same request, which must
    hand back the job already made instead of a second one."""
    from concurrent import futures

    from controller.security import write_secret
    from controller.tls import server_credentials

    monkeypatch.delenv("TENAX_TOKEN", raising=False)
    monkeypatch.setenv("TENAX_HOME", str(tmp_path / "no-local-cluster"))
    api = _api(etcd_url, tmp_path)
    token_file = tmp_path / "sam.token"
    write_secret(token_file, api.make_token("sam", "submitter"))
    real = pb_grpc.JobServiceStub(api.channel(token=api.tokens["sam"]))
    forwarded: list[str] = []

    class WritesThenFails(pb_grpc.JobServiceServicer):
        def SubmitJob(self, request, context):
            forwarded.append(real.SubmitJob(request, timeout=CALL_TIMEOUT_S).id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "lost the leader lease")

    flaky = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_JobServiceServicer_to_server(WritesThenFails(), flaky)
    port = flaky.add_secure_port("127.0.0.1:0", server_credentials(api.pki.server_tls()))
    flaky.start()
    try:
        job = tmp_path / "job.yaml"
        job.write_text("name: once\nsteps: 2\nglobal_batch_size: 2\nmicro_batch_size: 1\n")
        assert tenax(["submit", str(job), "--controller", f"127.0.0.1:{port},{api.address}",
                      "--ca-file", api.pki.ca_file, "--token-file", str(token_file)]) == 0
        out = capsys.readouterr().out
        assert len(forwarded) == 1 and f"job {forwarded[0]} submitted" in out
        assert _job_ids(api) == set(forwarded)
    finally:
        flaky.stop(None)
        api.stop()
