"""Authentication and authorization: the pure rules, tokens in etcd, and the interceptor over real gRPC."""

from __future__ import annotations

import argparse

import grpc
import pytest

from controller import auth
from cli.credentials import read_token
from controller.auth import Identity, authorize, bearer_token, new_token, parse_token
from controller.security import SecuritySettings
from controller.limits import Limits
from controller.tls import TlsSettings
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from tests.conftest import run_async
from tests.helpers.security_helpers import CALL_TIMEOUT_S, rpc_code, start_secured_api, tiny_spec

pytestmark = pytest.mark.timeout(60)

VIEWER = Identity(name="vera", role="viewer", via="token")
SUBMITTER = Identity(name="sam", role="submitter", via="token")
OTHER_SUBMITTER = Identity(name="olga", role="submitter", via="token")
ADMIN = Identity(name="ada", role="admin", via="certificate")
CANCEL = "/tenax.v1.JobService/CancelJob"


# ------------------------------------------------------------------ pure rules
def test_authorize_roles_and_ownership():
    assert authorize(None, CANCEL) == (False, "no credentials")
    allowed, reason = authorize(VIEWER, CANCEL, "vera")
    assert not allowed and "needs role submitter" in reason
    assert authorize(SUBMITTER, CANCEL, "sam").allowed
    allowed, reason = authorize(SUBMITTER, CANCEL, "olga")
    assert not allowed and "another user" in reason
    assert not authorize(SUBMITTER, CANCEL, None).allowed  # no owner recorded: admins only
    assert authorize(ADMIN, CANCEL, "olga").allowed
    assert authorize(VIEWER, "/tenax.v1.JobService/GetJob").allowed
    assert not authorize(VIEWER, "/tenax.v1.JobService/SubmitJob").allowed
    assert authorize(SUBMITTER, "/tenax.v1.JobService/SubmitJob").allowed
    for method in ("CordonNode", "UncordonNode", "DrainNode"):
        assert not authorize(SUBMITTER, f"/tenax.v1.NodeService/{method}").allowed
        assert authorize(ADMIN, f"/tenax.v1.NodeService/{method}").allowed
    assert not authorize(SUBMITTER, "/tenax.v1.AuditService/ListAudit").allowed
    assert authorize(None, "/grpc.health.v1.Health/Check").allowed


def test_unclassified_methods_need_admin_and_are_audited():
    assert not authorize(SUBMITTER, "/tenax.v1.ChaosService/KillWorker").allowed
    assert authorize(ADMIN, "/tenax.v1.ChaosService/KillWorker").allowed
    assert auth.rule_for("/tenax.v1.ChaosService/KillWorker").mutating


def test_every_rpc_in_the_contract_is_classified():
    """A new RPC must be put in METHOD_RULES on purpose (unclassified ones fall back to admin-only)."""
    missing = [f"/{svc.full_name}/{m.name}" for svc in pb.DESCRIPTOR.services_by_name.values()
               for m in svc.methods if f"/{svc.full_name}/{m.name}" not in auth.METHOD_RULES]
    assert missing == []
    mutating = {m for m, rule in auth.METHOD_RULES.items() if rule.mutating}
    assert mutating == {"/tenax.v1.JobService/SubmitJob", CANCEL, "/tenax.v1.NodeService/CordonNode",
                        "/tenax.v1.NodeService/UncordonNode", "/tenax.v1.NodeService/DrainNode",
                        "/tenax.v1.ChaosService/Inject"}
    assert auth.METHOD_RULES["/tenax.v1.ChaosService/Inject"].role == "admin"


# ------------------------------------------------------------------ tokens
def test_tokens_are_random_parsed_and_stored_only_as_salted_hashes():
    token, record = new_token("sam", "submitter", now=1.0)
    other, other_record = new_token("sam", "submitter", now=1.0)
    token_id, secret = parse_token(token)
    assert token != other and token_id == record.token_id
    assert secret not in record.to_json() and token not in record.to_json()
    assert record.salt != other_record.salt and record.digest != other_record.digest
    assert record.matches(secret) and not record.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert auth.TokenRecord.from_json(record.to_json()) == record
    for bad in ("", "tnx", "tnx.zz.secret", token + "x", "Bearer " + token, None, 42):
        assert parse_token(bad) is None
    with pytest.raises(auth.AuthError, match="role"):
        new_token("sam", "root")
    with pytest.raises(auth.AuthError, match="name"):
        new_token("$(rm -rf /)", "viewer")


def test_bearer_token_metadata():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer a"), ("authorization", "Bearer b")]) is None
    assert bearer_token([]) is None and bearer_token(None) is None


def test_cli_token_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("tnx.0123456789abcdef.secret\n")
    assert read_token(str(path), env={}) == "tnx.0123456789abcdef.secret"
    assert read_token(None, env={"TENAX_TOKEN": " abc "}) == "abc"
    assert read_token(None, env={}) is None
    with pytest.raises(auth.AuthError, match="cannot read"):
        read_token(str(tmp_path / "missing"), env={})
    (tmp_path / "empty").write_text("")
    with pytest.raises(auth.AuthError, match="empty"):
        read_token(str(tmp_path / "empty"), env={})


def test_no_command_takes_a_token_on_argv():
    from cli.main import build_parser

    def option_strings(parser):
        for action in parser._actions:
            yield from action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from option_strings(sub)

    options = set(option_strings(build_parser()))
    assert "--token-file" in options
    assert not {o for o in options if o in ("--token", "--bearer", "--password", "--secret")}


def test_token_store_in_etcd_authenticates_and_revokes(etcd_url):
    from common.etcd import Etcd
    from protos.keys import Keys

    async def body():
        async with Etcd(etcd_url) as etcd:
            keys = Keys("/sec")
            store = auth.TokenStore(etcd, keys, cache_ttl_s=0)
            token, record = await store.create("sam", "submitter", operator=auth.operator_identity())
            assert await store.authenticate(token) == Identity(name="sam", role="submitter", via="token")
            assert await store.authenticate(token[:-1] + "x") is None
            raw = (await etcd.get(keys.token(record.token_id))).value
            assert parse_token(token)[1] not in raw
            await etcd.put(keys.token("garbage"), "{not json")  # malformed records are skipped
            assert [r.name for r in await store.list()] == ["sam"]
            assert await store.revoke("sam", operator=auth.operator_identity()) == 1
            assert await store.authenticate(token) is None

    run_async(body(), 30)


# ------------------------------------------------------------------ through gRPC
@pytest.fixture
def api(etcd_url, tmp_path):
    api = start_secured_api(etcd_url, tmp_path)
    for name, role in (("vera", "viewer"), ("sam", "submitter"), ("olga", "submitter"), ("ada", "admin")):
        api.make_token(name, role)
    yield api
    api.stop()


def _jobs(api, name: str | None, **kw) -> pb_grpc.JobServiceStub:
    return pb_grpc.JobServiceStub(api.channel(token=api.tokens[name] if name else None, **kw))


def test_no_or_bad_credentials_are_unauthenticated(api):
    anonymous = _jobs(api, None)
    for call in (lambda: anonymous.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S),
                 lambda: anonymous.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec()), timeout=CALL_TIMEOUT_S),
                 lambda: list(anonymous.WatchJob(pb.WatchJobRequest(job_id="x"), timeout=CALL_TIMEOUT_S))):
        assert rpc_code(call) == grpc.StatusCode.UNAUTHENTICATED
    forged = pb_grpc.JobServiceStub(api.channel(token=api.tokens["sam"][:-2] + "zz"))
    with pytest.raises(grpc.RpcError) as err:
        forged.CancelJob(pb.CancelJobRequest(job_id="x"), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid" in err.value.details()
    assert api.etcd_keys(api.keys.jobs()) == []
    audited = [(r.method.rsplit("/", 1)[-1], r.code, r.identity) for r in api.audit()]
    assert sorted(audited) == [("CancelJob", "UNAUTHENTICATED", ""), ("SubmitJob", "UNAUTHENTICATED", "")]


def test_roles_and_ownership_over_grpc(api):
    sam, olga, vera, ada = (_jobs(api, n) for n in ("sam", "olga", "vera", "ada"))
    job = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("sams")), timeout=CALL_TIMEOUT_S)
    assert api.run(api.etcd.get(api.keys.job_owner(job.id))).value == "sam"
    assert rpc_code(lambda: vera.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec()), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        vera.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "needs role submitter" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        olga.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "another user" in err.value.details()
    assert api.run(api.etcd.get(api.keys.job_cancel(job.id))) is None  # refused: nothing written
    assert vera.GetJob(pb.GetJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).id == job.id
    assert sam.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).id == job.id
    assert ada.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).id == job.id
    nodes = pb_grpc.NodeServiceStub(api.channel(token=api.tokens["sam"]))
    assert rpc_code(lambda: nodes.CordonNode(pb.NodeRequest(node_id="n1"), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.PERMISSION_DENIED
    admin_nodes = pb_grpc.NodeServiceStub(api.channel(token=api.tokens["ada"]))
    assert rpc_code(lambda: admin_nodes.CordonNode(pb.NodeRequest(node_id="n1"), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.NOT_FOUND  # allowed; the node just does not exist
    audited = [(r.identity, r.method.rsplit("/", 1)[-1], r.target, r.code) for r in reversed(api.audit())]
    assert audited == [
        ("sam", "SubmitJob", job.id, "OK"),  # the job it created, not the spec
        ("vera", "SubmitJob", "tiny", "PERMISSION_DENIED"),
        ("vera", "CancelJob", job.id, "PERMISSION_DENIED"),
        ("olga", "CancelJob", job.id, "PERMISSION_DENIED"),
        ("sam", "CancelJob", job.id, "OK"),
        ("ada", "CancelJob", job.id, "OK"),
        ("sam", "CordonNode", "n1", "PERMISSION_DENIED"),
        ("ada", "CordonNode", "n1", "NOT_FOUND"),
    ]


def test_audit_is_readable_by_admins_only_over_grpc(api):
    sam = _jobs(api, "sam")
    job = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("one")), timeout=CALL_TIMEOUT_S)
    viewer_audit = pb_grpc.AuditServiceStub(api.channel(token=api.tokens["vera"]))
    assert rpc_code(lambda: viewer_audit.ListAudit(pb.ListAuditRequest(), timeout=CALL_TIMEOUT_S)) == \
        grpc.StatusCode.PERMISSION_DENIED
    admin_audit = pb_grpc.AuditServiceStub(api.channel(token=api.tokens["ada"]))
    records = admin_audit.ListAudit(pb.ListAuditRequest(limit=10), timeout=CALL_TIMEOUT_S).records
    assert [(r.identity, r.role, r.via, r.target, r.code) for r in records
            if not r.method.startswith(auth.TOKEN_AUDIT_METHOD)] == [("sam", "submitter", "token", job.id, "OK")]


def test_certificate_identity_and_token_precedence(etcd_url, tmp_path):
    from controller.tls import ensure_dev_pki

    pki = ensure_dev_pki(tmp_path, clients={"admin": "admin", "carol": "submitter", "norole": "",
                                            "viewer-cert": "viewer"})
    api = start_secured_api(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls(mutual=True)))
    try:
        carol = pb_grpc.JobServiceStub(api.channel(client_cert="carol"))
        job = carol.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("carols")), timeout=CALL_TIMEOUT_S)
        assert api.run(api.etcd.get(api.keys.job_owner(job.id))).value == "carol"
        viewer = pb_grpc.JobServiceStub(api.channel(client_cert="viewer-cert"))
        assert rpc_code(lambda: viewer.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)) == \
            grpc.StatusCode.PERMISSION_DENIED
        # With both, the token is this call's explicit credential: a viewer token on carol's connection.
        token = api.make_token("vic", "viewer")
        mixed = pb_grpc.JobServiceStub(api.channel(client_cert="carol", token=token))
        assert rpc_code(lambda: mixed.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert carol.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).id == job.id
        vias = {(r.identity, r.via) for r in api.audit()}
        assert vias == {("carol", "certificate"), ("viewer-cert", "certificate"), ("vic", "token")}
    finally:
        api.stop()


def test_rate_size_and_jobs_per_user_limits(etcd_url, tmp_path):
    from controller.tls import ensure_dev_pki

    pki = ensure_dev_pki(tmp_path)
    limits = Limits(calls_per_s=0.001, burst=5, max_active_jobs_per_user=2, max_request_bytes=8 << 10,
                    max_string_chars=512)
    api = start_secured_api(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls(), limits=limits))
    try:
        sam = _jobs_token(api, api.make_token("sam", "submitter"))
        assert sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("a")), timeout=CALL_TIMEOUT_S).id
        assert sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("b")), timeout=CALL_TIMEOUT_S).id
        with pytest.raises(grpc.RpcError) as err:
            sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("c")), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "active jobs" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            sam.GetJob(pb.GetJobRequest(job_id="x" * 600), timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in err.value.details()
        big = pb.SubmitJobRequest(spec=pb.JobSpec(name="n" * (9 << 10)))
        with pytest.raises(grpc.RpcError) as err:  # refused by gRPC before any handler runs
            sam.SubmitJob(big, timeout=CALL_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        codes = [rpc_code(lambda: sam.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S)) for _ in range(3)]
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED  # burst of 5 spent, refill ~never
        other = _jobs_token(api, api.make_token("vera", "viewer"))  # buckets are per identity
        assert other.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S) is not None
        assert len(api.etcd_keys(api.keys.owners())) == 2
    finally:
        api.stop()


def _jobs_token(api, token: str) -> pb_grpc.JobServiceStub:
    return pb_grpc.JobServiceStub(api.channel(token=token))


def test_open_mode_must_be_explicit_and_warns(caplog):
    import logging

    caplog.set_level(logging.WARNING)
    settings = SecuritySettings.insecure_for_tests()
    assert settings.tls == TlsSettings(mode="plaintext") and not settings.auth.enabled
    auth.SecurityInterceptor(settings=settings.auth)
    assert any("authentication is OFF" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="TokenStore"):
        auth.SecurityInterceptor()  # tokens on by default: needs a store
