"""What a communication failure on a survivor means, from the exception text (issue #20).

A survivor's collective or pipeline transfer fails with the backend's message (gloo on CPU,
NCCL on GPU), or it is told to stop by a peer that saw one (the abort key's reason carries
that peer's exception text, trainer/abort.py). ``classify(text) -> (class, evidence)`` names
the class; the worker puts it into its recovery record (``comm_error``) and the controller
into the recovery entry and event, next to the root cause. Pure; the patterns are matched
against real messages in tests/common/test_comm_errors.py.

Classes, most telling first (a text that matches several gets the first):

    peer-died      the other end went away: gloo "Connection closed by peer" / "Connection
                   reset by peer" (kill -9 of a peer, measured on torch 2.13), NCCL's
                   ncclRemoteError "remote process exited or there was a network error",
                   a refused reconnect, a broken pipe
    timeout        nothing came in time: NCCL's "Watchdog caught collective operation timeout",
                   gloo "Timed out waiting ... for recv operation", this project's own
                   "did not complete within" backstop
    nccl-error     NCCL failed on its own: "NCCL error ... unhandled system error", "internal
                   error", "unhandled cuda error", "invalid usage", an aborted communicator
    other          a communication failure of none of these kinds
"""

from __future__ import annotations

import re

PEER_DIED = "peer-died"
TIMEOUT = "timeout"
NCCL_ERROR = "nccl-error"
OTHER = "other"
CLASSES = (PEER_DIED, TIMEOUT, NCCL_ERROR, OTHER)
"""Every class, most telling first (``most_telling`` picks by this order)."""

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (PEER_DIED, re.compile(
        r"connection (closed|reset) by peer|remote process exited|remote worker crash|ncclRemoteError"
        r"|broken pipe|connection refused|end of file|peer.{0,20}(died|exited|disconnected)", re.I)),
    (TIMEOUT, re.compile(
        r"watchdog caught collective operation timeout|timed out|timeout\(ms\)|did not complete within"
        r"|watchdog got stuck|operation timeout", re.I)),
    (NCCL_ERROR, re.compile(
        r"nccl error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError|ncclInvalidUsage"
        r"|ncclInvalidArgument|unhandled (system|cuda) error|internal error|communicator was aborted"
        r"|nccl operations have failed", re.I)),
)
EVIDENCE_CHARS = 160
"""How much of the matching text around the match is kept as evidence."""


def classify(text: str) -> tuple[str, str]:
    """(class, evidence) of one exception's text: the class per the module docstring, and the
    part of the text that decided it (the whole text, cut, for ``other``). Pure."""
    flat = " ".join(str(text).split())
    for name, pattern in _PATTERNS:
        match = pattern.search(flat)
        if match:
            start = max(match.start() - EVIDENCE_CHARS // 2, 0)
            return name, flat[start:start + EVIDENCE_CHARS]
    return OTHER, flat[:EVIDENCE_CHARS]


def most_telling(classes) -> str:
    """The most telling of several ranks' classes ("" when none): one peer-died report explains
    the timeouts of ranks that waited behind it. Pure."""
    found = [c for c in classes if c in CLASSES]
    return min(found, key=CLASSES.index) if found else ""
