"""`tenax tokens`, `tenax certs`, `tenax audit`, and the local-cluster bootstrap."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cli import credentials
from cli.controller import controller_tls_args
from cli.main import build_parser
from cli.main import main as tenax
from controller import security
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from tests.helpers.security_helpers import CALL_TIMEOUT_S, start_secured_api, tiny_spec

pytestmark = pytest.mark.timeout(60)


def test_tokens_create_list_revoke(etcd_url, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TENAX_TOKEN", raising=False)
    out = tmp_path / "sam.token"
    assert tenax(["tokens", "--etcd", etcd_url, "create", "sam", "--role", "submitter", "--out", str(out)]) == 0
    token = out.read_text().strip()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert token not in capsys.readouterr().out  # written to the file, not echoed
    assert tenax(["tokens", "--etcd", etcd_url, "create", "vera", "--role", "viewer"]) == 0
    shown = capsys.readouterr()
    assert shown.out.startswith("tnx.") and "not shown again" in shown.err
    assert tenax(["tokens", "--etcd", etcd_url, "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["role"]) for r in rows] == [("sam", "submitter"), ("vera", "viewer")]
    assert all("digest" not in r and "salt" not in r for r in rows)
    assert tenax(["tokens", "--etcd", etcd_url, "revoke", "vera"]) == 0
    assert tenax(["tokens", "--etcd", etcd_url, "revoke", "vera"]) == 1  # nothing left to revoke
    with pytest.raises(SystemExit):
        tenax(["tokens", "--etcd", etcd_url, "create", "x", "--role", "root"])


def test_certs_dev_and_client(tmp_path, capsys):
    assert tenax(["certs", "dev", str(tmp_path), "--host", "tenax.internal"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert os.path.isfile(paths["ca"]) and os.path.isfile(paths["server"]["cert_file"])
    assert tenax(["certs", "client", str(tmp_path), "dana", "--role", "submitter"]) == 0
    dana = json.loads(capsys.readouterr().out)
    assert dana["ca"] == paths["ca"] and dana["cert_file"].endswith("client-dana.pem")


def test_audit_command_reads_the_log_through_the_api(etcd_url, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TENAX_TOKEN", raising=False)
    monkeypatch.setenv("TENAX_HOME", str(tmp_path / "no-local-cluster"))
    api = start_secured_api(etcd_url, tmp_path)
    try:
        sam = pb_grpc.JobServiceStub(api.channel(token=api.make_token("sam", "submitter")))
        job = sam.SubmitJob(pb.SubmitJobRequest(spec=tiny_spec("audited")), timeout=CALL_TIMEOUT_S)
        admin_file, sam_file = tmp_path / "admin.token", tmp_path / "sam.token"
        security.write_secret(admin_file, api.make_token("ada", "admin"))
        security.write_secret(sam_file, api.tokens["sam"])
        base = ["audit", "--controller", api.address, "--ca-file", api.pki.ca_file]
        assert tenax(base + ["--json", "--token-file", str(admin_file)]) == 0
        [record] = [r for r in map(json.loads, capsys.readouterr().out.splitlines())
                    if not r["method"].startswith("tokens/")]  # the tokens made above are audited too
        assert (record["identity"], record["target"], record["code"]) == ("sam", job.id, "OK")
        assert record["method"] == "/tenax.v1.JobService/SubmitJob"
        assert tenax(base + ["--token-file", str(sam_file)]) == 1
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        monkeypatch.setenv("TENAX_TOKEN", api.tokens["ada"])  # the environment works too
        assert tenax(base) == 0
        assert "audited" in capsys.readouterr().out
        assert tenax(["audit", "--controller", api.address]) == 2  # no CA: refuse rather than go plaintext
        assert "--ca-file" in capsys.readouterr().err
    finally:
        api.stop()


def test_local_bootstrap_makes_pki_and_a_reusable_admin_token(etcd_url, tmp_path):
    first = security.bootstrap_local(tmp_path, etcd_url)
    token = open(first["token_file"]).read().strip()
    assert stat.S_IMODE(os.stat(first["token_file"]).st_mode) == 0o600
    again = security.bootstrap_local(tmp_path, etcd_url)
    assert open(again["token_file"]).read().strip() == token  # still valid in etcd: kept
    assert controller_tls_args(again)[:2] == ["--tls", "tls"]
    state = {"controller": "127.0.0.1:1", "controllers": ["127.0.0.1:1"], "security": again}
    assert credentials.local_security_for("127.0.0.1:1", state) == again
    assert credentials.local_security_for("evil.example:443", state) is None  # never leak the local token


def test_server_flags_refuse_to_start_without_tls_unless_plaintext_is_asked_for():
    import argparse

    from cli.controller import add_controller_args, security_settings_from_args, settings_from_args

    parser = argparse.ArgumentParser()
    add_controller_args(parser)
    with pytest.raises(ValueError, match="--tls"):
        security_settings_from_args(parser.parse_args([]))
    with pytest.raises(ValueError, match="--tls"):
        settings_from_args(parser.parse_args([]))
    settings = security_settings_from_args(parser.parse_args(["--tls", "plaintext", "--no-auth"]))
    assert settings.tls.plaintext and not settings.auth.enabled


def test_tokens_etcd_flags_have_no_environment_defaults(monkeypatch):
    for name in ("TENAX_ETCD", "TENAX_ETCD_PREFIX", "TENAX_ETCD_CA", "TENAX_ETCD_CERT", "TENAX_ETCD_KEY"):
        monkeypatch.setenv(name, "/ignored")
    args = build_parser().parse_args(["tokens", "list"])
    assert (args.etcd, args.prefix, args.etcd_ca, args.etcd_cert, args.etcd_key) == \
        ("http://127.0.0.1:2379", "/tenax", "", "", "")
