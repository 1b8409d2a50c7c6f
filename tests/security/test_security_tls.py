"""TLS: dev PKI, TLS and mutual TLS on the gRPC API, etcd over TLS (real etcd)."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from common.embedded_etcd import EtcdServerTls, start_etcd
from common.etcd import Etcd, EtcdTls, EtcdUnavailable
from controller.security import SecuritySettings
from controller.tls import (
    PLAINTEXT_WARNING,
    CertSettings,
    TlsError,
    TlsSettings,
    aio_channel,
    ensure_dev_pki,
    server_credentials,
)
from protos import tenax_pb2 as pb
from protos import tenax_pb2_grpc as pb_grpc
from tests.conftest import run_async
from tests.helpers.security_helpers import CALL_TIMEOUT_S, rpc_code, start_secured_api

pytestmark = pytest.mark.timeout(60)


def _cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def test_dev_pki_names_hosts_roles_and_protects_keys(tmp_path):
    pki = ensure_dev_pki(tmp_path, hosts=("tenax.example", "10.1.2.3"))
    server = _cert(pki.server.cert_file)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "tenax.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= set(
        sans.get_values_for_type(x509.IPAddress))
    server.verify_directly_issued_by(_cert(pki.ca_file))
    admin = _cert(pki.clients["admin"].cert_file)
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "admin"
    for path in [pki.server.key_file, str(tmp_path / "pki" / "ca-key.pem")] + [
            c.key_file for c in pki.clients.values()]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_dev_pki_is_reused_and_reissued_when_hosts_change(tmp_path):
    first = ensure_dev_pki(tmp_path)
    before = _cert(first.server.cert_file).serial_number
    assert _cert(ensure_dev_pki(tmp_path).server.cert_file).serial_number == before
    changed = ensure_dev_pki(tmp_path, hosts=("new-host",))
    assert _cert(changed.server.cert_file).serial_number != before
    assert open(changed.ca_file).read() == open(first.ca_file).read()  # same CA: old client certs stay valid


def test_settings_are_validated_at_the_edge(tmp_path):
    pki = ensure_dev_pki(tmp_path)
    with pytest.raises(TlsError, match="tls.mode"):
        TlsSettings(mode="ssl").validate(server=True)
    with pytest.raises(TlsError, match="needs a certificate"):
        TlsSettings(mode="tls").validate(server=True)
    with pytest.raises(TlsError, match="ca_file"):
        TlsSettings(mode="tls").validate(server=False)
    with pytest.raises(TlsError, match="no such file"):
        TlsSettings(mode="tls", ca_file=str(tmp_path / "missing.pem")).validate(server=False)
    with pytest.raises(TlsError, match="client certificate"):
        TlsSettings(mode="mtls", ca_file=pki.ca_file).validate(server=False)
    with pytest.raises(TlsError, match="role"):
        CertSettings(common_name="x", organization="root", client=True).validate()
    assert server_credentials(pki.server_tls(mutual=True)) is not None


def test_plaintext_only_when_asked_and_it_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert server_credentials(TlsSettings(mode="plaintext")) is None

    async def open_and_close():
        await aio_channel("127.0.0.1:1", TlsSettings(mode="plaintext")).close()

    run_async(open_and_close(), 5)
    assert sum(PLAINTEXT_WARNING in r.getMessage() for r in caplog.records) == 2


def _list_jobs(channel: grpc.Channel) -> grpc.StatusCode:
    stub = pb_grpc.JobServiceStub(channel)
    return rpc_code(lambda: stub.ListJobs(pb.ListJobsRequest(), timeout=CALL_TIMEOUT_S))


def test_mutual_tls_admits_our_certificates_and_refuses_another_ca(etcd_url, tmp_path):
    pki = ensure_dev_pki(tmp_path / "ours", clients={"admin": "admin", "carol": "submitter", "norole": "",
                                                     "viewer-cert": "viewer"})
    api = start_secured_api(etcd_url, tmp_path / "ours", SecuritySettings(tls=pki.server_tls(mutual=True)))
    try:
        with api.channel(client_cert="viewer-cert") as ch:
            assert _list_jobs(ch) == grpc.StatusCode.OK
        foreign = ensure_dev_pki(tmp_path / "theirs", clients={"admin": "admin"})
        # A certificate from another CA (trusting our CA for the server side): the handshake fails.
        impostor = TlsSettings(mode="mtls", ca_file=pki.ca_file, cert_file=foreign.clients["admin"].cert_file,
                               key_file=foreign.clients["admin"].key_file)
        with api.channel(tls_override=impostor) as ch:
            assert _list_jobs(ch) == grpc.StatusCode.UNAVAILABLE
        with api.channel(tls_override=pki.client_tls(None)) as ch:  # no client certificate at all
            assert _list_jobs(ch) == grpc.StatusCode.UNAVAILABLE
        with api.channel(client_cert="norole") as ch:  # our CA, but no role in the certificate
            assert _list_jobs(ch) == grpc.StatusCode.UNAUTHENTICATED
        # A client that does not trust the server's CA refuses the server.
        with api.channel(tls_override=TlsSettings(mode="tls", ca_file=foreign.ca_file)) as ch:
            assert _list_jobs(ch) == grpc.StatusCode.UNAVAILABLE
        with api.channel(tls_override=TlsSettings(mode="plaintext")) as ch:
            assert _list_jobs(ch) == grpc.StatusCode.UNAVAILABLE
        refused = [r for r in api.audit() if r.code != "OK"]
        assert refused == []  # handshake failures never reach a handler; ListJobs is not audited
    finally:
        api.stop()


def test_etcd_client_over_tls_against_a_real_tls_etcd(tmp_path):
    pki = ensure_dev_pki(tmp_path)
    agent = pki.clients["agent"]
    server = start_etcd(tmp_path / "etcd-tls", log_path=tmp_path / "etcd-tls.log", tls=EtcdServerTls(
        cert_file=pki.server.cert_file, key_file=pki.server.key_file, ca_file=pki.ca_file,
        client_cert_file=agent.cert_file, client_key_file=agent.key_file))
    try:
        assert server.url.startswith("https://")

        async def body():
            async with Etcd(server.url, tls=EtcdTls(ca_file=pki.ca_file, cert_file=agent.cert_file,
                                                    key_file=agent.key_file)) as etcd:
                await etcd.put("/tls/a", "1")
                assert (await etcd.get("/tls/a")).value == "1"
                lease = await etcd.grant_lease(5)
                assert await etcd.create("/tls/b", "2", lease=lease)
                assert await etcd.keys_prefix("/tls/") == ["/tls/a", "/tls/b"]
            for refused in (Etcd(server.url, tls=EtcdTls(ca_file=pki.ca_file), timeout_s=2),  # no client cert
                            Etcd(server.url.replace("https", "http"), timeout_s=2)):           # plaintext
                try:
                    with pytest.raises(EtcdUnavailable):
                        await refused.connect()
                        await refused.get("/tls/a")
                finally:
                    await refused.close()

        run_async(body(), 40)
        with pytest.raises(ValueError, match="https"):
            Etcd(server.url)  # an https endpoint without TLS settings is a configuration error
    finally:
        server.kill()
