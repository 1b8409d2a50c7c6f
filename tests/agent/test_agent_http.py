"""agent/http.py: /logs is authenticated, lists the log index, and answers bad input with a 4xx."""

from __future__ import annotations

import asyncio
import json

from agent.http import AgentHttp
from cli.client import select_logs
from common import tokens


def _http(tmp_path, authorize=None) -> AgentHttp:
    (tmp_path / "rank-1.log").write_bytes(b"hello\nRuntimeError: boom\n")
    index = [{"node": "n0", "slot": 1, "pid": 7, "log": "rank-1.log", "ranks": {"1": 1, "2": 0}, "started": 1.0}]
    return AgentHttp(log_path=lambda job, rank: tmp_path / f"rank-{rank}.log", healthy=lambda: True,
                     log_index=lambda job: index,
                     log_file=lambda job, name: tmp_path / name if name == "rank-1.log" else None,
                     authorize=authorize)


def _get(http: AgentHttp, target: str, token: str | None = None) -> tuple[int, dict, bytes]:
    head = f"GET {target} HTTP/1.0\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n"
    return asyncio.run(http.respond(head.encode("utf-8")))  # a client may send any bytes


def test_logs_need_a_token_the_authorizer_accepts(tmp_path):
    async def authorize(header):
        token = tokens.bearer(header)
        return (200, "alice") if token == "good" else (401, "unknown, revoked or malformed token")

    http = _http(tmp_path, authorize)
    status, headers, body = _get(http, "/logs/job-1")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and b"token" in body
    assert _get(http, "/logs/job-1", "bad")[0] == 401
    status, _, body = _get(http, "/logs/job-1", "good")
    assert status == 200 and json.loads(body)[0]["log"] == "rank-1.log"
    status, headers, body = _get(http, "/logs/job-1/rank-1.log?offset=6", "good")
    assert (status, body, headers["X-Log-Size"]) == (200, b"RuntimeError: boom\n", "25")
    assert _get(http, "/metrics")[0] == 200 and _get(http, "/healthz")[0] == 200  # open to scrapers and probes


def test_bad_input_gets_a_4xx_with_a_reason(tmp_path):
    http = _http(tmp_path)
    for target in ("/logs/job-1/" + "9" * 5000, "/logs/j\xf6b/1", "/logs/j%C3%B6b/1", "/logs/job-1/1?offset=" + "1" * 5000,
                   "/logs/job-1/1?offset=-1", "/logs/job-1/..%2f..%2fetc%2fpasswd", "/logs/../etc/0",
                   "/logs/job-1/rank-1.log.json", "/logs/job-1/\u0661"):
        status, _, body = _get(http, target)
        assert 400 <= status < 500 and body.strip() and b"Traceback" not in body, (target[:40], status, body)
    assert _get(http, "/logs/job-1/rank-9-g2.log")[0] == 404  # a well-formed name the index does not list
    assert asyncio.run(http.respond(b"POST /logs HTTP/1.0\r\n\r\n"))[0] == 405
    assert asyncio.run(http.respond(b"\r\n"))[0] == 400


def test_select_logs_finds_a_rank_in_any_generation():
    first = {"node": "n0", "slot": 1, "log": "rank-1.log", "ranks": {"1": 1}, "started": 1.0, "state": "FAILED"}
    survivor = {"node": "n1", "slot": 0, "log": "rank-2.log", "ranks": {"1": 2, "2": 1}, "started": 0.5}
    other = {"node": "n0", "slot": 0, "log": "rank-0.log", "ranks": {"1": 0, "2": 0}, "started": 0.1}
    entries = [first, survivor, other]
    assert select_logs(entries, rank=1, generation=1) == [first]
    assert select_logs(entries, rank=1, generation=2) == [survivor]
    assert select_logs(entries, rank=1) == [survivor, first]  # oldest process first
    assert select_logs(entries, node="n0", slot=1) == [first]
    assert select_logs(entries, current=2) == [other, survivor]
    assert select_logs(entries, every=True, current=2) == [other, survivor, first]
    assert select_logs(entries, rank=5) == []
