"""Issue #18, findings 2 and 7, through the real controller, real gRPC and etcd: a flood of
refused anonymous calls cannot flush the audit log; token create/revoke/expiry are audited
with the operator's identity; tokens can expire."""

from __future__ import annotations

import time

import grpc
import pytest

from controller.audit import AuditSettings
from controller.limits import Limits
from controller.security import SecuritySettings
from controller.tls import ensure_dev_pki
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from tests.helpers.security_helpers import CALL_TIMEOUT_S, rpc_code, start_real_controller, tiny_spec

pytestmark = pytest.mark.timeout(120)


def test_anonymous_flood_cannot_evict_authenticated_audit_records(etcd_url, tmp_path):
    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(
        tls=pki.server_tls(), limits=Limits(calls_per_s=10_000, burst=10_000),
        audit=AuditSettings(max_records=50, trim_every=1, refused_window_s=0.5)))
    try:
        sam = pb_grpc.JobServiceStub(api.channel(token=api.make_token("sam", "submitter")))
        job = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("mine")), timeout=CALL_TIMEOUT_S)
        anonymous = pb_grpc.JobServiceStub(api.channel())
        forged = pb_grpc.JobServiceStub(api.channel(token="tnx.0123456789abcdef." + "A" * 43))
        flood = 4 * 50  # four times the retention, within the rate limit
        for i in range(flood):
            stub = anonymous if i % 2 else forged
            assert rpc_code(lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)) \
                == grpc.StatusCode.UNAUTHENTICATED
            if i == flood // 2:
                time.sleep(0.6)  # a second window
        deadline = time.monotonic() + 10  # the last refusal is audited just after its reply went out
        while sum(r.count for r in api.audit() if r.identity == "") < flood and time.monotonic() < deadline:
            time.sleep(0.1)
        records = api.audit()
        mine = [r for r in records if r.identity == "sam"]
        assert [(r.method.rsplit("/", 1)[-1], r.target, r.code) for r in mine] == [("SubmitJob", job.id, "OK")]
        refused = [r for r in records if r.identity == ""]
        assert sum(r.count for r in refused) == flood  # every refused call is counted ...
        assert 1 <= len(refused) <= 4  # ... per source, method, result and window, not one record each
        assert {(r.method.rsplit("/", 1)[-1], r.code, r.via) for r in refused} == \
            {("CancelJob", "UNAUTHENTICATED", "none")}
        assert all(r.peer.startswith("ipv4:127.0.0.1") for r in refused)
    finally:
        api.stop()


def test_token_create_revoke_and_expiry_are_audited(etcd_url, tmp_path, capsys, monkeypatch):
    from cli.main import main as tenax
    from controller import auth

    monkeypatch.delenv("TENAX_TOKEN", raising=False)
    pki = ensure_dev_pki(tmp_path)
    api = start_real_controller(etcd_url, tmp_path, SecuritySettings(tls=pki.server_tls(), token_cache_s=0.0))
    try:
        operator = auth.operator_identity().name
        base = ["tokens", "--etcd", etcd_url]
        assert tenax(base + ["create", "ann", "--role", "admin", "--out", str(tmp_path / "ann.token")]) == 0
        assert tenax(base + ["revoke", "ann"]) == 0
        assert tenax(base + ["create", "tmp", "--role", "viewer", "--expires-in", "2s",
                             "--out", str(tmp_path / "tmp.token")]) == 0
        capsys.readouterr()
        short_lived = (tmp_path / "tmp.token").read_text().strip()
        viewer = pb_grpc.JobServiceStub(api.channel(token=short_lived))
        assert viewer.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S) is not None
        time.sleep(2.2)
        assert rpc_code(lambda: viewer.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert api.etcd_keys(api.keys.tokens()) == []  # the expired token is gone from etcd too
        admin = pb_grpc.AuditServiceStub(api.channel(token=api.make_token("ada", "admin")))
        records = admin.ListAudit(pb.ListAuditRequest(limit=100), timeout=CALL_TIMEOUT_S).records
        tokens = [(r.method, r.identity, r.via, r.target.split(" ")[0]) for r in reversed(records)
                  if r.method.startswith("tokens/")]
        assert tokens == [("tokens/create", operator, "etcd", "ann"), ("tokens/revoke", operator, "etcd", "ann"),
                          ("tokens/create", operator, "etcd", "tmp"),
                          ("tokens/expire", "tenax-controller", "system", "tmp"),
                          ("tokens/create", operator, "etcd", "ada")]
        with pytest.raises(SystemExit):
            tenax(base + ["create", "x", "--role", "viewer", "--expires-in", "soon"])
    finally:
        api.stop()
