"""The agent's small HTTP endpoint (asyncio, HTTP/1.0, GET only).

* ``GET /metrics``                      Prometheus text (agent.metrics.REGISTRY)
* ``GET /healthz``                      ``ok`` (200) while the node is registered, else 503
* ``GET /logs/<job>``                   this node's log index of the job: one JSON object per
                                        worker process (node, slot, pid, log name, the rank it held
                                        in each plan generation, how it ended, its last error)
* ``GET /logs/<job>/<log>?offset=N``    bytes of that log (a name from the index) from ``offset``
* ``GET /logs/<job>/<rank>?offset=N``   bytes of the log of the worker holding ``rank`` now
                                        (at most ``limit``, default 1 MiB, per read); headers
                                        ``X-Next-Offset`` and ``X-Log-Size``; 404 if there is no such log

``/logs`` is authenticated: ``Authorization: Bearer <token>``, an API token of role viewer or
above, checked against the token records in etcd (common/tokens.py, the same records and hash
as the controller's API). Without one: 401; etcd unreachable: 503. Logs hold tracebacks, paths
and data samples, so they get the API's protection; /metrics and /healthz stay open for
scrapers and probes. ``tenax agent --logs-auth off`` serves them without a token (a cluster
whose controller runs ``--no-auth``). Bad input (a non-ASCII path, an absurd rank or offset)
gets a 4xx with one line saying why, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 1024 * 1024
REQUEST_TIMEOUT_S = 5.0
AUTH_TIMEOUT_S = 5.0
MAX_REQUEST_HEAD = 16 * 1024
"""Longest request line plus headers (bytes); longer requests get 400."""
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RANK_RE = re.compile(r"^[0-9]{1,6}$")
_LOG_RE = re.compile(r"^rank-[0-9]{1,6}(-g[0-9]{1,12})?\.log$")
_INT_RE = re.compile(r"^[0-9]{1,18}$")
_STATUS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}

Authorize = Callable[[str | None], Awaitable[tuple[int, str]]]
"""Authorization header value (or None) -> (200, who) if allowed, else (4xx/503, why)."""


class AgentHttp:
    def __init__(self, *, log_path: Callable[[str, int], Path], healthy: Callable[[], bool],
                 log_index: Callable[[str], list[dict[str, Any]]] | None = None,
                 log_file: Callable[[str, str], Path | None] | None = None,
                 authorize: Authorize | None = None) -> None:
        self.log_path = log_path
        self.healthy = healthy
        self.log_index = log_index or (lambda job: [])
        self.log_file = log_file or (lambda job, name: None)
        self.authorize = authorize
        """None: /logs without authentication (``--logs-auth off``)."""
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (asyncio.LimitOverrunError, ValueError):
                head = b""
            status, headers, body = await self.respond(head)
            writer.write(_response(status, headers, body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # one bad request must never take the endpoint down
            log.exception("http request failed")
        finally:
            writer.close()

    async def respond(self, head: bytes) -> tuple[int, dict[str, str], bytes]:
        """The answer to one request head (request line + headers)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split() if lines else []
        if len(parts) < 2:
            return 400, {}, b"bad request\n"
        if parts[0] != b"GET":
            return 405, {}, b"only GET\n"
        try:
            target = parts[1].decode("ascii")
            path = unquote(urlsplit(target).path, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return 400, {}, b"the path must be ASCII (percent-encoded UTF-8 is refused too)\n"
        if not path.isascii():
            return 400, {}, b"the path must be ASCII (percent-encoded UTF-8 is refused too)\n"
        if path.startswith("/logs/") and self.authorize is not None:
            header = None
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if sep and name.strip().lower() == b"authorization":
                    header = value.strip().decode("latin-1")
            try:
                code, why = await asyncio.wait_for(self.authorize(header), AUTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                code, why = 503, "cannot check the token now (etcd slow); retry"
            if code != 200:
                extra = {"WWW-Authenticate": 'Bearer realm="tenax"'} if code == 401 else {}
                return code, extra, f"{why}\n".encode()
        try:
            return self.route(target)
        except Exception:
            log.exception("http request %s failed", target[:200])
            return 500, {}, b"internal error (logged by the agent)\n"

    def route(self, target: str) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(target)
        path = url.path
        if path == "/metrics":
            return 200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(metrics.REGISTRY)
        if path == "/healthz":
            return (200, {}, b"ok\n") if self.healthy() else (503, {}, b"not registered\n")
        if path.startswith("/logs/"):
            return self._logs(unquote(path[len("/logs/"):]), parse_qs(url.query))
        return 404, {}, b"not found\n"

    def _logs(self, rest: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        job, sep, which = rest.partition("/")
        if not _JOB_RE.match(job):
            return 400, {}, b"usage: /logs/<job>, /logs/<job>/<log name> or /logs/<job>/<rank> (job: a job id)\n"
        if not sep:
            return 200, {"Content-Type": "application/json"}, json.dumps(self.log_index(job)).encode()
        if _RANK_RE.match(which):
            path: Path | None = self.log_path(job, int(which))
        elif _LOG_RE.match(which):
            path = self.log_file(job, which)
        else:
            return 400, {}, b"usage: /logs/<job>/<rank> (rank: at most 6 digits) or /logs/<job>/<log name>\n"
        offset_text = query.get("offset", ["0"])[0]
        limit_text = query.get("limit", [str(MAX_LOG_CHUNK)])[0]
        if not (_INT_RE.match(offset_text) and _INT_RE.match(limit_text)):
            return 400, {}, b"offset and limit must be integers >= 0 (at most 18 digits)\n"
        offset, limit = int(offset_text), min(int(limit_text), MAX_LOG_CHUNK)
        if path is None:
            return 404, {}, f"no log {which} of job {job} on this node\n".encode()
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(min(offset, size))
                data = f.read(limit)
        except FileNotFoundError:
            return 404, {}, f"no log for job {job} {which} on this node\n".encode()
        next_offset = min(offset, size) + len(data)
        return 200, {"Content-Type": "application/octet-stream", "X-Next-Offset": str(next_offset),
                     "X-Log-Size": str(size)}, data


def _response(status: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.0 {status} {_STATUS.get(status, 'Error')}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not any(k.lower() == "content-type" for k in headers):
        lines.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
