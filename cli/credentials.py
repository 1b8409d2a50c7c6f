"""The client side of the API's security: flags, TLS settings, the token, channels that carry it.

``add_client_args(parser)`` adds ``--ca-file``, ``--cert-file``, ``--key-file``,
``--plaintext``, ``--server-name`` and ``--token-file`` (the token itself never
goes on the command line; it comes from that file or ``$TENAX_TOKEN``), and
``client_channel(args, target)`` opens a blocking channel that carries the token
on every call. For a local cluster (``tenax up``), whatever the flags and the
environment leave open comes from its ``security`` record (dev CA, admin token
file), but only for its own controllers.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import grpc

from controller import auth
from controller.tls import TlsSettings, sync_channel

ENV_CA = "TENAX_CA_FILE"
ENV_CERT = "TENAX_CERT_FILE"
ENV_KEY = "TENAX_KEY_FILE"
ENV_TOKEN_FILE = "TENAX_TOKEN_FILE"
ENV_PLAINTEXT = "TENAX_PLAINTEXT"
TOKEN_ENV = "TENAX_TOKEN"



def read_token(token_file: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The CLI's token: from ``token_file`` if given, else ``$TENAX_TOKEN``; never from argv."""
    if token_file:
        return auth.read_token_file(token_file)
    token = (os.environ if env is None else env).get(TOKEN_ENV, "").strip()
    return token or None


def add_client_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--ca-file", default=os.environ.get(ENV_CA, ""),
                       help=f"CA that signed the controller's certificate (default ${ENV_CA})")
    group.add_argument("--cert-file", default=os.environ.get(ENV_CERT, ""),
                       help=f"client certificate for mutual TLS (default ${ENV_CERT})")
    group.add_argument("--key-file", default=os.environ.get(ENV_KEY, ""),
                       help=f"its private key (default ${ENV_KEY})")
    group.add_argument("--server-name", default="", help="name expected in the controller's certificate")
    group.add_argument("--plaintext", action="store_true", default=os.environ.get(ENV_PLAINTEXT) == "1",
                       help=f"no TLS (development only; logs a warning; or ${ENV_PLAINTEXT}=1)")
    group.add_argument("--token-file", default=os.environ.get(ENV_TOKEN_FILE, ""),
                       help=f"file holding the API token (default ${ENV_TOKEN_FILE}, else ${TOKEN_ENV})")


def client_tls_from_args(args: argparse.Namespace, local: dict | None = None) -> TlsSettings:
    """Flags and environment first; else the local cluster's CA (``local``: its ``security`` record)."""
    if getattr(args, "plaintext", False):
        return TlsSettings(mode="plaintext")
    ca_file = getattr(args, "ca_file", "") or (local or {}).get("ca_file", "")
    if not ca_file:
        raise ValueError("no CA to verify the controller with: pass --ca-file or set TENAX_CA_FILE "
                         "(or --plaintext for a controller started without TLS)")
    cert_file = getattr(args, "cert_file", "")
    return TlsSettings(mode="mtls" if cert_file else "tls", ca_file=ca_file, cert_file=cert_file,
                       key_file=getattr(args, "key_file", ""),
                       server_name=getattr(args, "server_name", "")).validate(server=False)


def client_token(args: argparse.Namespace, local: dict | None = None) -> str | None:
    """``--token-file``, else ``$TENAX_TOKEN``, else the local cluster's admin token file."""
    token = read_token(getattr(args, "token_file", "") or None)
    if token is None and (local or {}).get("token_file"):
        token = read_token(local["token_file"])
    return token


def client_channel(args: argparse.Namespace, target: str, *, local: dict | None = None,
                   options: list | None = None) -> grpc.Channel:
    """A blocking channel to ``target`` with TLS and the caller's token on every call.

    ``local`` is the ``security`` record of the local cluster (``tenax up``), used
    for whatever the flags and environment leave open.
    """
    channel = sync_channel(target, client_tls_from_args(args, local), options)
    token = client_token(args, local)
    return grpc.intercept_channel(channel, auth.TokenClientInterceptor(token)) if token else channel


def local_security_for(target: str, state: dict | None) -> dict | None:
    """The local cluster's ``security`` record, only if ``target`` is one of its controllers. Pure.

    Never hand the local admin token to some other server the user pointed us at.
    """
    if not state or not isinstance(state.get("security"), dict):
        return None
    controllers = state.get("controllers") or [state.get("controller")]
    return state["security"] if target in controllers else None


def local_channel(address: str, record: dict) -> grpc.Channel:
    """A blocking channel to a local cluster's controller with its CA and admin token (tests, `tenax demo`)."""
    return client_channel(argparse.Namespace(), address, local=record)


def client_env(record: dict) -> dict[str, str]:
    """Environment that points child `tenax` commands at a local cluster's CA and admin token."""
    return {ENV_CA: record["ca_file"], ENV_TOKEN_FILE: record["token_file"]}
