"""common/tokens.py: the token check the agents' /logs shares with the API (pure parts)."""

from __future__ import annotations

import secrets

from common.tokens import digest, record_matches


def _record(secret: str, **extra) -> dict:
    salt = secrets.token_hex(16)
    return {"salt": salt, "digest": digest(salt, secret), "name": "ana", "role": "viewer", **extra}


def test_a_matching_unexpired_token_names_its_owner_and_role():
    assert record_matches(_record("s3cret"), "s3cret", now=100.0) == ("ana", "viewer")
    assert record_matches(_record("s3cret", expires=200.0), "s3cret", now=100.0) == ("ana", "viewer")


def test_a_wrong_secret_an_expired_token_or_a_bad_record_is_refused():
    assert record_matches(_record("s3cret"), "guess", now=100.0) is None
    assert record_matches(_record("s3cret", expires=100.0), "s3cret", now=100.0) is None  # expiry is exclusive
    assert record_matches(_record("s3cret", expires="never"), "s3cret", now=100.0) is None
    assert record_matches(_record("s3cret", role="root"), "s3cret", now=100.0) is None
    assert record_matches(["not", "a", "dict"], "s3cret", now=100.0) is None
