"""API tokens: their format and the hash etcd keeps (the controller's controller/auth.py and
the agent's /logs endpoint both check tokens with this; one spelling of the math).

A token is ``tnx.<id>.<secret>``; etcd keeps, at ``Keys.token(id)``, its name, role, a
random salt and sha256(salt || secret) (never the token). Why a fast hash: see
controller/auth.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any

from common.etcd import Etcd
from protos.keys import Keys

ROLES = ("viewer", "submitter", "admin")
"""Least to most privileged."""
TOKEN_PREFIX = "tnx"
TOKEN_RE = re.compile(r"^tnx\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
HASH_ALGORITHM = "sha256-salted"


def digest(salt_hex: str, secret: str) -> str:
    """sha256(salt || secret), hex."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """``tnx.<id>.<secret>`` -> (id, secret); None if it does not look like a token. Pure."""
    match = TOKEN_RE.match(token.strip()) if isinstance(token, str) else None
    return (match.group(1), match.group(2)) if match else None


def role_at_least(role: str, least: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(least)


def record_matches(data: Any, secret: str, *, now: float) -> tuple[str, str] | None:
    """(name, role) if the stored token record ``data`` (a dict) is well formed, not expired at
    ``now`` (unix seconds) and ``secret`` matches its hash; None otherwise. Pure."""
    if not isinstance(data, dict) or data.get("algorithm", HASH_ALGORITHM) != HASH_ALGORITHM:
        return None
    expires = data.get("expires", 0.0)
    if not isinstance(expires, (int, float)) or isinstance(expires, bool) or (expires and now >= expires):
        return None
    salt, want, name, role = (data.get(k) for k in ("salt", "digest", "name", "role"))
    if not all(isinstance(v, str) for v in (salt, want, name, role)) or role not in ROLES:
        return None
    try:
        got = digest(salt, secret)
    except ValueError:  # a salt that is not hex
        return None
    return (name, role) if hmac.compare_digest(got, want) else None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None. Pure."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def verify(etcd: Etcd, keys: Keys, token: str, *, least_role: str = "viewer") -> tuple[str, str] | None:
    """(name, role) of a valid token with at least ``least_role``; None if it is not one.
    One etcd read (raises EtcdUnavailable / EtcdError when the store cannot be read)."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    kv = await etcd.get(keys.token(parsed[0]))
    if kv is None:
        return None
    try:
        data = json.loads(kv.value)
    except ValueError:
        return None
    found = record_matches(data, parsed[1], now=time.time())
    return found if found is not None and role_at_least(found[1], least_role) else None
