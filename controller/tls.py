"""TLS for every Tenax connection: the gRPC API, and the etcd clients of controllers and agents.

Three modes, chosen once at the edge (``TlsSettings``):

* ``tls``        the server proves who it is (certificate from our CA); clients
                 authenticate with a bearer token (controller/auth.py).
* ``mtls``       as above, and every client must also show a certificate signed
                 by the same CA; its subject names the identity (CN) and role (O).
* ``plaintext``  no encryption at all. Only when asked for explicitly, and it
                 logs a warning every time a server or channel is made with it.

``ensure_dev_pki(state_dir)`` makes a local development CA and certificates
(``tenax up`` calls it), idempotently: existing, still valid files are reused,
so a restarted local cluster keeps its identities. Private keys are written
with mode 0600. This CA is for development only; production brings its own
certificates (cert-manager in the Helm chart).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

MODES = ("tls", "mtls", "plaintext")
ROLE_NAMES = ("viewer", "submitter", "admin")  # mirrors controller/auth.py (kept import-free)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
PLAINTEXT_WARNING = "TLS is OFF (plaintext asked for explicitly): anyone on the network can read and forge calls"


class TlsError(ValueError):
    """TLS material is missing, unreadable or inconsistent (permanent: fix the files or flags)."""


# ------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class TlsSettings:
    """How one server or client secures its connections."""

    mode: str = "tls"
    """``tls``, ``mtls`` (client certificates required) or ``plaintext`` (explicit opt-out)."""
    ca_file: str = ""
    """PEM bundle of the CA that signs our certificates (servers: verifies client certs; clients: verifies the server)."""
    cert_file: str = ""
    """PEM certificate of this side (server: required unless plaintext; client: required for mtls)."""
    key_file: str = ""
    """PEM private key matching ``cert_file``."""
    server_name: str = ""
    """Clients only: host name expected in the server certificate, if not the dialled host."""

    def validate(self, *, server: bool) -> "TlsSettings":
        if self.mode not in MODES:
            raise TlsError(f"tls.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "plaintext":
            return self
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsError("tls.cert_file and tls.key_file: give both or neither")
        if server and not self.cert_file:
            raise TlsError("tls.cert_file: a TLS server needs a certificate and key (or mode=plaintext)")
        if not self.ca_file and (self.mode == "mtls" or not server):
            raise TlsError("tls.ca_file: required to verify the other side")
        if self.mode == "mtls" and not server and not self.cert_file:
            raise TlsError("tls.cert_file: mutual TLS needs a client certificate")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise TlsError(f"tls.{name}: no such file {path!r}")
        return self

    @property
    def plaintext(self) -> bool:
        return self.mode == "plaintext"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {path!r}: {exc}") from exc


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """gRPC server credentials; None means plaintext (warned about)."""
    settings.validate(server=True)
    if settings.plaintext:
        log.warning("gRPC server: %s", PLAINTEXT_WARNING)
        return None
    root = _read(settings.ca_file) if settings.ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(settings.key_file), _read(settings.cert_file))],
        root_certificates=root,
        require_client_auth=settings.mode == "mtls",
    )


def add_port(server: grpc.aio.Server, address: str, settings: TlsSettings) -> int:
    """Bind ``address`` with the settings' security; return the bound port."""
    creds = server_credentials(settings)
    if creds is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, creds)


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """gRPC channel credentials for a client; None means plaintext (warned about)."""
    settings.validate(server=False)
    if settings.plaintext:
        log.warning("gRPC client: %s", PLAINTEXT_WARNING)
        return None
    key = _read(settings.key_file) if settings.key_file else None
    cert = _read(settings.cert_file) if settings.cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=_read(settings.ca_file), private_key=key,
                                        certificate_chain=cert)


def channel_options(settings: TlsSettings) -> list[tuple[str, str]]:
    if settings.server_name and not settings.plaintext:
        return [("grpc.ssl_target_name_override", settings.server_name)]
    return []


def aio_channel(target: str, settings: TlsSettings, options: list | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` secured as ``settings`` say."""
    creds = channel_credentials(settings)
    opts = list(options or []) + channel_options(settings)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, creds, options=opts)


def sync_channel(target: str, settings: TlsSettings, options: list | None = None) -> grpc.Channel:
    """A blocking channel (the CLI) to ``target`` secured as ``settings`` say."""
    creds = channel_credentials(settings)
    opts = list(options or []) + channel_options(settings)
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, creds, options=opts)


# ------------------------------------------------------------- peer identity
@dataclass(frozen=True)
class PeerCertificate:
    """What a verified client certificate says about its holder."""

    common_name: str
    organization: str
    """The role the CA granted (``O=`` in the subject); empty if none."""


def peer_certificate(auth_context: dict) -> PeerCertificate | None:
    """Read the verified client certificate from a gRPC auth context, if any.

    gRPC fills ``x509_pem_cert`` only after the TLS handshake verified the chain
    against our CA, so what we read here is trustworthy.
    """
    pem = (auth_context.get("x509_pem_cert") or [b""])[0]
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return PeerCertificate(common_name=_subject_attr(cert, NameOID.COMMON_NAME),
                           organization=_subject_attr(cert, NameOID.ORGANIZATION_NAME))


def _subject_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    attrs = cert.subject.get_attributes_for_oid(oid)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


# --------------------------------------------------------------- generation
@dataclass(kw_only=True)
class CertSettings:
    """What a generated certificate says."""

    common_name: str
    """Subject CN: the identity (user name, or the service name for servers)."""
    organization: str = ""
    """Subject O: the role granted to a client certificate (viewer, submitter, admin)."""
    hosts: tuple[str, ...] = ()
    """DNS names and IP addresses the certificate is valid for (servers)."""
    server: bool = False
    """May serve TLS (serverAuth)."""
    client: bool = False
    """May authenticate as a TLS client (clientAuth)."""
    valid_days: int = 365
    """Lifetime (days)."""

    def validate(self) -> "CertSettings":
        if not self.common_name or len(self.common_name) > 64:
            raise TlsError(f"certificate common_name: must be 1-64 characters, got {self.common_name!r}")
        if self.organization and self.organization not in ROLE_NAMES:
            raise TlsError(f"certificate organization: must be a role ({', '.join(ROLE_NAMES)}), "
                           f"got {self.organization!r}")
        if not (self.server or self.client):
            raise TlsError("certificate: must be usable as server, client or both")
        if self.server and not self.hosts:
            raise TlsError("certificate hosts: a server certificate needs at least one host")
        if self.valid_days < 1:
            raise TlsError(f"certificate valid_days: must be >= 1, got {self.valid_days}")
        return self


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: small, fast handshakes, supported by every gRPC/etcd TLS stack.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def generate_ca(common_name: str = "tenax-dev-ca", *, valid_days: int = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_certificate(ca: Issued, settings: CertSettings) -> Issued:
    """A leaf certificate signed by ``ca``."""
    settings.validate()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, settings.common_name)]
    if settings.organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.organization))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if settings.server else []) + \
             ([ExtendedKeyUsageOID.CLIENT_AUTH] if settings.client else [])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=settings.valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if settings.hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in settings.hosts]),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# ------------------------------------------------------------------ dev PKI
@dataclass(frozen=True)
class CertPaths:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class DevPki:
    """Where ``ensure_dev_pki`` put things (all under ``<state_dir>/pki``)."""

    ca_file: str
    server: CertPaths
    """Controller gRPC server and etcd server (serverAuth + clientAuth: etcd peers and clients)."""
    clients: dict[str, CertPaths] = field(default_factory=dict)
    """Client certificates by identity name (``admin``, ``controller``, ``agent`` ...)."""

    def server_tls(self, *, mutual: bool = False) -> TlsSettings:
        return TlsSettings(mode="mtls" if mutual else "tls", ca_file=self.ca_file,
                           cert_file=self.server.cert_file, key_file=self.server.key_file)

    def client_tls(self, name: str | None = None) -> TlsSettings:
        """Client settings; with ``name`` it presents that client certificate (mTLS)."""
        if name is None:
            return TlsSettings(mode="tls", ca_file=self.ca_file)
        paths = self.clients[name]
        return TlsSettings(mode="mtls", ca_file=self.ca_file, cert_file=paths.cert_file, key_file=paths.key_file)


# identity name -> role written into the certificate's O field
DEFAULT_DEV_CLIENTS = {"admin": "admin", "controller": "admin", "agent": "admin"}
_RENEW_BEFORE = datetime.timedelta(days=7)


def ensure_dev_pki(state_dir: str | Path, *, hosts: tuple[str, ...] = (),
                   clients: dict[str, str] | None = None) -> DevPki:
    """Create (or reuse) a development CA, a server certificate and client certificates.

    ``hosts`` are added to the server certificate's names besides localhost and
    the loopback addresses. ``clients`` maps identity name -> role. Files that
    exist, parse, chain to the CA, cover the hosts and do not expire within a
    week are kept; anything else is (re)issued.
    """
    pki = Path(state_dir) / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    clients = DEFAULT_DEV_CLIENTS if clients is None else clients
    all_hosts = tuple(dict.fromkeys(DEFAULT_HOSTS + tuple(hosts)))

    ca = _load_or_create_ca(pki)
    server = _ensure_leaf(pki, "server", ca, CertSettings(common_name="tenax-server", hosts=all_hosts,
                                                          server=True, client=True))
    issued = {
        name: _ensure_leaf(pki, f"client-{name}", ca, CertSettings(common_name=name, organization=role,
                                                                    client=True))
        for name, role in clients.items()
    }
    return DevPki(ca_file=str(pki / "ca.pem"), server=server, clients=issued)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    # Write then rename so a crash never leaves a half-written key behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _load_or_create_ca(pki: Path) -> Issued:
    cert_path, key_path = pki / "ca.pem", pki / "ca-key.pem"
    if cert_path.is_file() and key_path.is_file():
        ca = Issued(cert_path.read_bytes(), key_path.read_bytes())
        try:
            cert = x509.load_pem_x509_certificate(ca.cert_pem)
            if cert.not_valid_after_utc - _now() > _RENEW_BEFORE:
                return ca
        except ValueError:
            pass
        log.warning("dev CA in %s is unreadable or about to expire: making a new one", pki)
    ca = generate_ca()
    _write(key_path, ca.key_pem, private=True)
    _write(cert_path, ca.cert_pem, private=False)
    return ca


def _ensure_leaf(pki: Path, stem: str, ca: Issued, settings: CertSettings) -> CertPaths:
    paths = CertPaths(cert_file=str(pki / f"{stem}.pem"), key_file=str(pki / f"{stem}-key.pem"))
    if not _leaf_still_good(paths, ca, settings):
        leaf = issue_certificate(ca, settings)
        _write(Path(paths.key_file), leaf.key_pem, private=True)
        _write(Path(paths.cert_file), leaf.cert_pem, private=False)
    return paths


def _leaf_still_good(paths: CertPaths, ca: Issued, settings: CertSettings) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(Path(paths.cert_file).read_bytes())
        Path(paths.key_file).stat()
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # missing, unparsable or not from this CA: reissue (cheap)
        return False
    if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
        return False
    if settings.hosts:
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        names = {str(n) for n in sans.get_values_for_type(x509.DNSName)} | \
                {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        if not {str(_normalize_host(h)) for h in settings.hosts} <= names:
            return False
    return _subject_attr(cert, NameOID.ORGANIZATION_NAME) == settings.organization


def _normalize_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host
