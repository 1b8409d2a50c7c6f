"""Limits (pure) and the audit log (pure retention + real etcd)."""

from __future__ import annotations

import json

import pytest

from controller.audit import (
    AuditLog,
    AuditRecord,
    AuditSettings,
    clean_text,
    first_key_to_keep,
    list_limit,
    time_of_key,
)
from common.etcd import Etcd
from controller.limits import Limits, RateLimiter, TokenBucket, jobs_per_user_problem, oversized_string, server_options
from controller.security import job_is_active
from protos import tenax_pb2 as pb
from protos.keys import Keys
from tests.conftest import run_async

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ limits
def test_token_bucket_spends_refills_and_caps():
    bucket = TokenBucket(rate=2.0, capacity=3.0, tokens=3.0, updated=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # refill caps at capacity
    assert not bucket.take(50.0)  # a clock going backwards grants nothing


def test_rate_limiter_is_per_key_and_bounded():
    now = [0.0]
    limiter = RateLimiter(Limits(calls_per_s=1.0, burst=2, max_tracked_callers=2), clock=lambda: now[0])
    assert [limiter.allow("a")[0] for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")[0]
    allowed, wait = limiter.allow("a")
    assert not allowed and wait == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.allow("a")[0]
    limiter.allow("c")  # three callers, room for two: the least recently seen ("b") is forgotten
    assert set(limiter._buckets) == {"a", "c"}


def test_limits_are_validated_and_become_server_options():
    with pytest.raises(ValueError, match="calls_per_s"):
        Limits(calls_per_s=0).validate()
    with pytest.raises(ValueError, match="max_request_bytes"):
        Limits(max_request_bytes=0).validate()
    assert ("grpc.max_receive_message_length", 1234) in server_options(Limits(max_request_bytes=1234))


def test_oversized_string_finds_nested_repeated_and_map_fields():
    assert oversized_string(pb.SubmitJobRequest(spec=pb.JobSpec(name="ok")), 10) is None
    assert oversized_string(pb.SubmitJobRequest(spec=pb.JobSpec(data=pb.DataSpec(path="p" * 11))), 10) == \
        "spec.data.path"
    node = pb.NodeInfo(labels={"k": "v" * 11})
    assert oversized_string(node, 10) == "labels[]"
    assert oversized_string(pb.NodeInfo(labels={"k" * 11: "v"}), 10) == "labels[key]"
    plan = pb.Plan(workers=[pb.WorkerAssignment(node="a"), pb.WorkerAssignment(node="b" * 11)])
    assert oversized_string(plan, 10) == "workers.node"


def test_jobs_per_user_problem():
    assert jobs_per_user_problem(1, 2) is None
    assert "limit 2" in jobs_per_user_problem(2, 2)


def test_job_is_active_fails_closed():
    assert job_is_active(None)
    assert job_is_active("{garbage")
    assert job_is_active(json.dumps({"phase": "RUNNING"}))
    assert not job_is_active(json.dumps({"phase": "CANCELLED"}))


# ------------------------------------------------------------------ audit (pure)
def _key(ns: int) -> str:
    return Keys("/t").audit_record(ns, "abcd")


def test_retention_by_count_and_age():
    settings = AuditSettings(max_records=3, max_age_s=10.0)
    keys = [_key(int(t * 1e9)) for t in (1, 2, 3, 4, 5)]
    assert first_key_to_keep(keys, now_s=5.0, settings=settings) == keys[2]  # count: keep the newest 3
    assert first_key_to_keep(keys, now_s=13.5, settings=settings) == keys[3]  # age: stamps before 3.5 s go
    assert first_key_to_keep(keys, now_s=100.0, settings=settings) is None  # all too old
    assert first_key_to_keep([], now_s=0.0, settings=settings) is None
    mixed = keys[:2] + ["/t/audit/garbage"] + keys[2:]
    assert first_key_to_keep(mixed, now_s=5.0, settings=AuditSettings(max_records=4)) == keys[2]
    assert time_of_key(keys[0]) == 1_000_000_000 and time_of_key("/t/audit/x-y") is None


def test_audit_settings_and_text_cleaning():
    with pytest.raises(ValueError, match="max_records"):
        AuditSettings(max_records=0).validate()
    assert clean_text("a\x1b[31mb\nc", 100) == "a?[31mb?c"
    assert clean_text("x" * 50, 10) == "xxxxxxx..."
    assert list_limit(0) == 100 and list_limit(5) == 5 and list_limit(10**9) == 10_000
    with pytest.raises(ValueError):
        AuditRecord.from_json('{"time": "yesterday"}')


# ------------------------------------------------------------------ audit (etcd)
def test_audit_log_writes_trims_and_reads_newest_first(etcd_url):
    now = [1000.0]

    def record(i: int) -> AuditRecord:
        return AuditRecord(time=1000.0 + i, identity="sam", role="submitter", via="token",
                           method="/tenax.v1.JobService/SubmitJob", target=f"job-{i}", code="OK")

    async def body():
        async with Etcd(etcd_url) as etcd:
            keys = Keys("/aud")
            log = AuditLog(etcd, keys, AuditSettings(max_records=5, max_age_s=60.0, trim_every=4),
                           clock=lambda: now[0])
            for i in range(10):
                await log.record(record(i))
            # trimmed after writes 4 and 8 (to 5 records), then 2 more written
            assert len(await etcd.keys_prefix(keys.audit())) == 7
            await etcd.put(keys.audit_record(int(1009.5e9), "zzzz"), "not json")  # malformed: skipped on read
            newest = await log.newest(3)
            assert [r.target for r in newest] == ["job-9", "job-8"]
            assert await log.trim() == 3
            assert [r.target for r in await log.newest(100)] == ["job-9", "job-8", "job-7", "job-6"]
            now[0] = 1000.0 + 8 + 60.0  # records 6 and 7 are now older than 60 s
            assert await log.trim() == 2
            assert [r.target for r in await log.newest(100)] == ["job-9", "job-8"]
            assert log.written == 10 and log.failed == 0

    run_async(body(), 30)


def test_audit_write_failure_never_raises(etcd_server, caplog):
    async def body():
        etcd = Etcd(etcd_server.url, timeout_s=1.0)
        await etcd.connect()
        log = AuditLog(etcd, Keys("/aud"))
        etcd_server.kill()
        await log.record(AuditRecord(time=1.0, identity="x", role="admin", via="token", method="m",
                                     target="t", code="OK"))
        assert log.failed == 1
        await etcd.close()

    run_async(body(), 30)
    assert any("audit record not stored" in r.getMessage() for r in caplog.records)
