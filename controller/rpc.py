"""The plumbing every gRPC service of the controller shares.

One mapping from errors to gRPC status codes (``status_for``): ``RpcAbort``
carries its own code; SpecError and oversized or malformed requests ->
INVALID_ARGUMENT (naming the field); etcd down (``EtcdUnavailable``) ->
UNAVAILABLE, so the client retries; a permanent etcd refusal (``EtcdError``) and
anything unexpected -> INTERNAL, without a traceback to the client. The
``unary`` and ``streaming`` decorators apply it to a handler and count requests
(``tenax_grpc_requests_total``); ``checked_job_id`` and ``checked_node_id`` check ids.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import grpc

from common.etcd import EtcdError, EtcdUnavailable
from common.spec import SpecError
from controller import metrics

log = logging.getLogger("tenax.controller")

MAX_REQUEST_BYTES = 64 * 1024
"""Largest request we parse; bigger ones are refused with INVALID_ARGUMENT."""
_JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,78}[a-z0-9])?$")
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")


class RpcAbort(Exception):
    """End the call with ``code`` and ``message`` (raised by handlers)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_EXPECTED = (RpcAbort, SpecError, EtcdError, EtcdUnavailable)
"""Errors a handler may raise on purpose; anything else is a bug and is logged with its traceback."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcAbort):
        return exc.code, exc.message
    if isinstance(exc, SpecError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {exc}"
    if isinstance(exc, EtcdUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable, retry: {exc}"
    if isinstance(exc, EtcdError):
        return grpc.StatusCode.INTERNAL, f"etcd error: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"


def check_size(request: Any) -> None:
    size = request.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"request is {size} bytes; the limit is {MAX_REQUEST_BYTES}")


def unary(fn):
    """Map domain errors to gRPC status codes and count requests."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        code = grpc.StatusCode.OK
        try:
            check_size(request)
            return await fn(self, request, context)
        except _EXPECTED as exc:
            code, message = status_for(exc)
        except Exception as exc:  # never leak a traceback to the client
            log.exception("%s failed", fn.__name__)
            code, message = status_for(exc)
        finally:
            metrics.GRPC_REQUESTS.labels(fn.__name__, code.name).inc()
        await context.abort(code, message)
    return wrapper


def streaming(fn):
    """``unary`` for a server-streaming handler (an async generator)."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        code = grpc.StatusCode.OK
        try:
            check_size(request)
            async for item in fn(self, request, context):
                yield item
        except _EXPECTED as exc:
            code, message = status_for(exc)
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            code, message = status_for(exc)
        finally:
            metrics.GRPC_REQUESTS.labels(fn.__name__, code.name).inc()
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)
    return wrapper


def checked_job_id(value: str) -> str:
    """``value`` if it is a well-formed job id; else RpcAbort(INVALID_ARGUMENT)."""
    if not _JOB_ID_RE.match(value):
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"job_id: must be 1-80 lowercase letters, digits or '-', got {value[:80]!r}")
    return value


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def checked_request_id(value: str) -> str:
    """``value`` ('' or a well-formed SubmitJob request id); else RpcAbort(INVALID_ARGUMENT)."""
    if value and not _REQUEST_ID_RE.match(value):
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"request_id: must be 1-64 letters, digits, '_' or '-', got {value[:64]!r}")
    return value


def checked_node_id(value: str) -> str:
    """``value`` if it is a well-formed node id; else RpcAbort(INVALID_ARGUMENT)."""
    if not _NODE_ID_RE.match(value):
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"node_id: must be 1-128 letters, digits, '.', '_' or '-', got {value[:128]!r}")
    return value
