"""Job events: the record, the last exception line of a log, rendering older records."""

from __future__ import annotations

import pytest

from common import events
from protos.records import JobEventRecord


def test_last_exception_line_is_the_last_one_that_names_an_exception():
    log = ("--- tenax: rank 0 generation 1 on node-1 ---\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
           "ValueError: first\n"
           "During handling of the above exception, another exception occurred:\n"
           "torch.distributed.DistBackendError: [gloo] Connection closed by peer [127.0.0.1]:4242\n"
           "some trailing line\n")
    assert events.last_exception_line(log) == \
        "torch.distributed.DistBackendError: [gloo] Connection closed by peer [127.0.0.1]:4242"
    assert events.last_exception_line("step 1 loss 2.3\nstep 2 loss 2.1\n") == ""
    assert len(events.last_exception_line("RuntimeError: " + "x" * 5000)) == events.MAX_ERROR_CHARS


def test_log_tail_reads_from_the_process_start(tmp_path):
    path = tmp_path / "rank-0.log"
    path.write_bytes(b"RuntimeError: an older process\n" + b"new process output\n")
    start = len(b"RuntimeError: an older process\n")
    assert events.last_exception_line(events.log_tail(path, start=start)) == ""
    assert events.last_exception_line(events.log_tail(path)) == "RuntimeError: an older process"
    assert events.log_tail(tmp_path / "missing.log") == ""


def test_new_event_checks_the_kind_and_keeps_one_line():
    event = events.new_event("hang", "rank 1\nmade no progress", now=12.5, step=7, action="kill", data={"rank": 1})
    assert (event.kind, event.time, event.message, event.step, event.action) == \
        ("hang", 12.5, "rank 1 made no progress", 7, "kill")
    assert JobEventRecord.from_json(event.to_json()) == event
    with pytest.raises(ValueError, match="kind"):
        events.new_event("oops", "x")


def test_older_records_get_a_rendered_message_and_step():
    straggler = JobEventRecord(kind="straggler", time=1.0, data={
        "generation": 1, "policy": "rebalance", "flagged": {"1": {"step": 12, "score": 4.25}},
        "action": "rebalance", "action_step": 14, "action_reason": "shares 3,5"})
    text = events.describe(straggler)
    assert "rank 1 (score 4.25)" in text and "rebalance at step 14" in text
    assert events.event_step(straggler) == 14
    recovery = JobEventRecord(kind="recovery", time=2.0, data={"cause": "node-lost", "total_s": 1.5, "generation": 3,
                                                              "at_step": 20, "steps_lost": 1})
    assert events.describe(recovery).startswith("recovered from node-lost in 1.50 s")
    assert events.event_step(recovery) == 20 and events.event_generation(recovery) == 3
    d = events.event_json(recovery)
    assert d["message"] == events.describe(recovery) and d["data"]["cause"] == "node-lost"
