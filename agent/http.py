"""The agent's small HTTP endpoint (asyncio, HTTP/1.0, GET only).

* ``GET /metrics``                      Prometheus text (agent.metrics.REGISTRY)
* ``GET /healthz``                      ``ok`` (200) while the node is registered, else 503
* ``GET /logs/<job>/<rank>?offset=N``   bytes of the rank's log from ``offset`` (at most
                                        ``limit``, default 1 MiB); header ``X-Next-Offset``
                                        and ``X-Log-Size``; 404 if there is no such log
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics

log = logging.getLogger(__name__)

MAX_LOG_CHUNK = 1024 * 1024
REQUEST_TIMEOUT_S = 5.0
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AgentHttp:
    def __init__(self, *, log_path: Callable[[str, int], Path], healthy: Callable[[], bool]) -> None:
        self.log_path = log_path
        self.healthy = healthy
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
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
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) < 2:
                status, headers, body = 400, {}, b"bad request\n"
            elif parts[0] != "GET":
                status, headers, body = 405, {}, b"only GET\n"
            else:
                status, headers, body = self.route(parts[1])
            writer.write(_response(status, headers, body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # one bad request must never take the endpoint down
            log.exception("http request failed")
        finally:
            writer.close()

    def route(self, target: str) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(target)
        path = url.path
        if path == "/metrics":
            return 200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(metrics.REGISTRY)
        if path == "/healthz":
            return (200, {}, b"ok\n") if self.healthy() else (503, {}, b"not registered\n")
        if path.startswith("/logs/"):
            return self._logs(path[len("/logs/"):], parse_qs(url.query))
        return 404, {}, b"not found\n"

    def _logs(self, rest: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        job, _, rank_text = rest.partition("/")
        if not _JOB_RE.match(job) or not rank_text.isdigit():
            return 400, {}, b"usage: /logs/<job>/<rank>?offset=N\n"
        try:
            offset = int(query.get("offset", ["0"])[0])
            limit = min(int(query.get("limit", [str(MAX_LOG_CHUNK)])[0]), MAX_LOG_CHUNK)
        except ValueError:
            return 400, {}, b"offset and limit must be integers\n"
        if offset < 0 or limit < 0:
            return 400, {}, b"offset and limit must be >= 0\n"
        path = self.log_path(job, int(rank_text))
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(min(offset, size))
                data = f.read(limit)
        except FileNotFoundError:
            return 404, {}, f"no log for job {job} rank {rank_text} on this node\n".encode()
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
