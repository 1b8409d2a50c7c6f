"""`tenax audit`, `tenax tokens` and `tenax certs`.

* ``tenax audit [--json] [--limit N]`` reads the audit log through the API
  (``AuditService.ListAudit``, admins only); clients never talk to etcd.
* ``tenax tokens create|list|revoke`` manage API tokens. They are operator
  commands that write to etcd directly (whoever can write etcd already owns the
  cluster), which also solves the first-admin-token problem. ``create`` shows
  the token once (or writes it to ``--out`` with mode 0600); etcd keeps a hash.
  Every create and revoke writes an audit record, in the same etcd transaction,
  naming the operator (OS user@host, via etcd); ``--expires-in`` gives a token an
  expiry, after which the controller refuses it, deletes it and audits that.
* ``tenax certs dev DIR`` makes (or reuses) a development CA and certificates;
  ``tenax certs client DIR NAME --role R`` issues one more client certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time

import grpc

from cli import credentials
from cli.controller import etcd_tls_from_args
from cli.env import CONTROLLER, controller_from_env
from cli.local import local_cluster_state
from common.etcd import Etcd, EtcdError, EtcdUnavailable
from controller import auth, security, tls
from protos import tenax_pb2, tenax_pb2_grpc
from protos.keys import DEFAULT_PREFIX, Keys

RPC_TIMEOUT_S = 10.0


def register(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="show the audit log (admins)")
    audit.add_argument("--controller", default="", help=f"controller host:port (default ${CONTROLLER})")
    audit.add_argument("--limit", type=int, default=50, help="newest N records")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    credentials.add_client_args(audit)
    audit.set_defaults(func=run_audit)

    tokens = sub.add_parser("tokens", help="create, list or revoke API tokens (talks to etcd)")
    tokens.add_argument("--etcd", default="http://127.0.0.1:2379",
                        help="etcd endpoint(s) (default http://127.0.0.1:2379)")
    tokens.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"cluster key prefix (default {DEFAULT_PREFIX})")
    tokens.add_argument("--etcd-ca", default="", help="CA of etcd's certificate, for https:// endpoints")
    tokens.add_argument("--etcd-cert", default="", help="client certificate for etcd")
    tokens.add_argument("--etcd-key", default="", help="its private key")
    verbs = tokens.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = verbs.add_parser("create", help="make a token (shown once)")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=auth.ROLES)
    create.add_argument("--out", default="", help="write the token to this file (0600) instead of stdout")
    create.add_argument("--expires-in", type=duration_s, default=0.0, metavar="DURATION",
                        help="the token stops working after this long: seconds, or a number with s, m, h or d "
                             "(e.g. 90d); default: never")
    listing = verbs.add_parser("list", help="list tokens (names, roles; never secrets)")
    listing.add_argument("--json", action="store_true")
    revoke = verbs.add_parser("revoke", help="revoke a token by id, or every token of a name")
    revoke.add_argument("id_or_name")
    tokens.set_defaults(func=run_tokens)

    certs = sub.add_parser("certs", help="development certificates")
    kinds = certs.add_subparsers(dest="kind", metavar="KIND", required=True)
    dev = kinds.add_parser("dev", help="make or reuse a dev CA, server and client certificates under DIR/pki")
    dev.add_argument("dir")
    dev.add_argument("--host", action="append", default=[], help="extra server name or IP (repeatable)")
    client = kinds.add_parser("client", help="issue a client certificate from DIR's dev CA")
    client.add_argument("dir")
    client.add_argument("name")
    client.add_argument("--role", required=True, choices=auth.ROLES)
    certs.set_defaults(func=run_certs)


# ------------------------------------------------------------------ audit
def local_cluster() -> dict:
    """The record `tenax up` left (controller address, ``security``), or {} if there is none
    (a broken state file reads as none)."""
    return local_cluster_state() or {}


def run_audit(args: argparse.Namespace) -> int:
    local = local_cluster()
    target = args.controller or controller_from_env() or str(local.get("controller", ""))
    if not target:
        print(f"tenax audit: give --controller, set {CONTROLLER}, or start a local cluster", file=sys.stderr)
        return 2
    try:
        address = target.split(",")[0].strip()
        channel = credentials.client_channel(args, address, local=credentials.local_security_for(address, local))
    except ValueError as exc:
        print(f"tenax audit: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = tenax_pb2_grpc.AuditServiceStub(channel).ListAudit(
                tenax_pb2.ListAuditRequest(limit=args.limit), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"tenax audit: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for record in reply.records:
        print(json.dumps(audit_dict(record), sort_keys=True) if args.json else audit_line(record))
    return 0


def audit_dict(record: tenax_pb2.AuditRecord) -> dict:
    return {f.name: getattr(record, f.name) for f in record.DESCRIPTOR.fields}


def audit_line(record: tenax_pb2.AuditRecord) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.time))
    who = f"{record.identity or '-'}({record.role or '-'})"
    method = record.method.rsplit("/", 1)[-1]
    return f"{when}  {who:<24} {method:<14} {record.target or '-':<24} {record.code}  {record.detail}"


# ------------------------------------------------------------------ tokens
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds (argparse type; > 0)."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS_S else (text, "s")
    try:
        value = float(number) * _UNITS_S[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 3600, 90m, 12h or 30d)") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value


def run_tokens(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(asyncio.wait_for(_tokens(args), 30))
    except (EtcdError, EtcdUnavailable, ValueError, asyncio.TimeoutError) as exc:
        print(f"tenax tokens: {exc or 'timed out'}", file=sys.stderr)
        return 1


async def _tokens(args: argparse.Namespace) -> int:
    etcd_tls = etcd_tls_from_args(args)
    async with Etcd(args.etcd, tls=etcd_tls) as etcd:
        store = auth.TokenStore(etcd, Keys(args.prefix), cache_ttl_s=0)
        if args.verb == "create":
            token, record = await store.create(args.name, args.role, operator=auth.operator_identity(),
                                               expires_in_s=args.expires_in)
            if args.out:
                security.write_secret(args.out, token)
                print(f"token {record.token_id} for {record.name} ({record.role}) written to {args.out}")
            else:
                print(token)
                print(f"token {record.token_id} for {record.name} ({record.role}); it is not shown again",
                      file=sys.stderr)
            return 0
        if args.verb == "list":
            for record in await store.list():
                row = {"id": record.token_id, "name": record.name, "role": record.role, "created": record.created,
                       "expires": record.expires}
                expires = time.strftime('%Y-%m-%d %H:%M', time.gmtime(record.expires)) if record.expires else "never"
                print(json.dumps(row, sort_keys=True) if args.json else
                      f"{record.token_id}  {record.name:<24} {record.role:<10} "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(record.created))}  expires {expires}")
            return 0
        gone = await store.revoke(args.id_or_name, operator=auth.operator_identity())
        print(f"revoked {gone} token(s)")
        return 0 if gone else 1


# ------------------------------------------------------------------ certs
def run_certs(args: argparse.Namespace) -> int:
    try:
        if args.kind == "dev":
            pki = tls.ensure_dev_pki(args.dir, hosts=tuple(args.host))
            print(json.dumps({"ca": pki.ca_file, "server": pki.server.__dict__,
                              "clients": {k: v.__dict__ for k, v in pki.clients.items()}}, indent=2))
            return 0
        pki = tls.ensure_dev_pki(args.dir, clients={args.name: args.role})
        print(json.dumps({"ca": pki.ca_file, **pki.clients[args.name].__dict__}, indent=2))
        return 0
    except (ValueError, OSError) as exc:
        print(f"tenax certs: {exc}", file=sys.stderr)
        return 1
