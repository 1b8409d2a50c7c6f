"""The real controller (controller/server.py) behind TLS, tokens, roles and the audit log, over real gRPC."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.security import SecuritySettings
from controller.tls import TlsSettings, ensure_dev_pki
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from protos.records import NodeRecord
from tests.helpers.security_helpers import CALL_TIMEOUT_S, rpc_code, start_real_controller, tiny_spec

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def controller(etcd_url, tmp_path):
    api = start_real_controller(etcd_url, tmp_path)
    for name, role in (("vera", "viewer"), ("sam", "submitter"), ("olga", "submitter"), ("ada", "admin")):
        api.make_token(name, role)
    yield api
    api.stop()


def _stubs(api, name: str | None):
    channel = api.channel(token=api.tokens[name] if name else None)
    return pb_grpc.JobServiceStub(channel), pb_grpc.NodeServiceStub(channel)


def test_real_controller_authenticates_authorizes_and_audits(controller):
    api = controller
    anonymous, _ = _stubs(api, None)
    sam, _ = _stubs(api, "sam")
    olga, _ = _stubs(api, "olga")
    vera, vera_nodes = _stubs(api, "vera")
    ada, ada_nodes = _stubs(api, "ada")
    assert rpc_code(lambda: anonymous.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert rpc_code(lambda: anonymous.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec()), timeout=CALL_TIMEOUT_S)) \
        == grpc.StatusCode.UNAUTHENTICATED
    job = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("owned")), timeout=CALL_TIMEOUT_S)
    assert api.run(api.etcd.get(api.keys.job_owner(job.id))).value == "sam"
    with pytest.raises(grpc.RpcError) as err:
        vera.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        olga.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "another user" in err.value.details()
    assert api.run(api.etcd.get(api.keys.job_cancel(job.id))) is None
    assert [j.id for j in vera.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S).jobs] == [job.id]
    bad = pb.JobSpec(name="$(rm -rf /)")
    with pytest.raises(grpc.RpcError) as err:
        sam.SubmitJob(pb.SubmitJobRequest(spec=bad), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.value.details()
    assert sam.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).id == job.id
    api.run(api.etcd.put(api.keys.node("n1"), NodeRecord(id="n1", slots=1).to_json()))
    assert rpc_code(lambda: vera_nodes.CordonNode(pb.NodeRequest(node_id="n1"), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.PERMISSION_DENIED

    def cordon():
        return ada_nodes.CordonNode(pb.NodeRequest(node_id="n1"), timeout=CALL_TIMEOUT_S)

    assert rpc_code(cordon) in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)  # the cache may lag the put
    jobs_in_etcd = {api.keys.parse_job_key(k)[0] for k in api.etcd_keys(api.keys.jobs())}
    assert jobs_in_etcd == {job.id}  # refused submits wrote nothing
    records = api.audit()
    # refused calls without credentials are counted per source (not one record each)
    assert [(r.method.rsplit("/", 1)[-1], r.code, r.count) for r in records if not r.identity] == [
        ("SubmitJob", "UNAUTHENTICATED", 1)]
    audited = [(r.identity, r.method.rsplit("/", 1)[-1], r.code) for r in reversed(records) if r.identity]
    assert audited[:5] == [
        ("sam", "SubmitJob", "OK"),
        ("vera", "CancelJob", "PERMISSION_DENIED"),
        ("olga", "CancelJob", "PERMISSION_DENIED"),
        ("sam", "SubmitJob", "INVALID_ARGUMENT"),
        ("sam", "CancelJob", "OK"),
    ]
    assert audited[5] == ("vera", "CordonNode", "PERMISSION_DENIED") and audited[6][:2] == ("ada", "CordonNode")
    records = pb_grpc.AuditServiceStub(api.channel(token=api.tokens["ada"])).ListAudit(
        pb.ListAuditRequest(limit=4), timeout=CALL_TIMEOUT_S).records  # + the counted anonymous call
    assert [r.method.rsplit("/", 1)[-1] for r in records if r.identity] == ["CordonNode", "CordonNode", "CancelJob"]


def test_health_needs_no_credentials_but_plaintext_is_refused(controller):
    with controller.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with controller.channel(tls_override=TlsSettings(mode="plaintext")) as channel:
        assert rpc_code(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE


def test_real_controller_with_mutual_tls_refuses_another_ca(etcd_url, tmp_path):
    pki = ensure_dev_pki(tmp_path, clients={"admin": "admin", "carol": "submitter", "norole": "",
                                            "viewer-cert": "viewer"})
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls(mutual=True)))
    try:
        carol = pb_grpc.JobServiceStub(api.channel(client_cert="carol"))
        job = carol.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("by-cert")), timeout=CALL_TIMEOUT_S)
        assert api.run(api.etcd.get(api.keys.job_owner(job.id))).value == "carol"
        foreign = ensure_dev_pki(tmp_path / "other-ca", clients={"admin": "admin"})
        impostor = TlsSettings(mode="mtls", ca_file=pki.ca_file, cert_file=foreign.clients["admin"].cert_file,
                               key_file=foreign.clients["admin"].key_file)
        stub = pb_grpc.JobServiceStub(api.channel(tls_override=impostor))
        assert rpc_code(lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)) == \
            grpc.StatusCode.UNAVAILABLE
        assert api.run(api.etcd.get(api.keys.job_cancel(job.id))) is None
        assert [(r.identity, r.via, r.code) for r in api.audit()] == [("carol", "certificate", "OK")]
    finally:
        api.stop()


def test_real_controller_jobs_per_user_counts_only_active_jobs(etcd_url, tmp_path):
    import time

    from controller.limits import Limits

    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(
        tls=pki.server_tls(), limits=Limits(max_active_jobs_per_user=1)))
    try:
        sam = pb_grpc.JobServiceStub(api.channel(token=api.make_token("sam", "submitter")))
        first = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("first")), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as err:
            sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("second")), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 1" in err.value.details()
        sam.CancelJob(pb.CancelJobRequest(job_id=first.id), timeout=CALL_TIMEOUT_S)
        deadline = time.monotonic() + 20  # the leader turns the cancel request into phase CANCELLED
        while sam.GetJob(pb.GetJobRequest(job_id=first.id), timeout=CALL_TIMEOUT_S).status.phase != pb.CANCELLED:
            assert time.monotonic() < deadline, "job never reached CANCELLED"
            time.sleep(0.1)
        assert sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("third")), timeout=CALL_TIMEOUT_S).id
    finally:
        api.stop()


def test_unknown_job_phase_filter_is_invalid_argument(controller):
    """Found by the fuzzer: ListJobs(phases=[-1]) used to answer INTERNAL."""
    vera, _ = _stubs(controller, "vera")
    with pytest.raises(grpc.RpcError) as err:
        vera.ListJobs(pb.ListJobsRequest(phases=[-1]), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "phases" in err.value.details()
