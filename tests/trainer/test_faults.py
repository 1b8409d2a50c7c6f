"""The delay_send fault (trainer/faults.py) and the send hook it drives (trainer/comm.py)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from trainer import comm
from trainer.faults import FaultInjector, parse_faults
from trainer.schedule import PipelineStageRunner


def test_delay_send_is_parsed_and_scoped_to_its_rank_and_generation():
    faults = parse_faults("kind=delay_send,rank=0,peer=1,seconds=0.15,step=5; kind=kill,rank=2,step=3")
    injector = FaultInjector(faults, run_dir="")
    assert injector.send_delays(1, 0) == {1: (0.15, 5)}
    assert injector.send_delays(1, 1) == {} and injector.send_delays(2, 0) == {}
    with pytest.raises(ValueError, match="delay_send"):
        parse_faults("kind=delay_send,rank=0,seconds=0.1")  # no peer


def test_a_pipeline_send_to_the_delayed_peer_is_posted_late(monkeypatch):
    posted = []  # (dst, when): the real isend needs a peer process; the hook is what is tested
    monkeypatch.setattr(dist, "isend", lambda tensor, dst: posted.append((dst, time.perf_counter())) or object())
    runner = PipelineStageRunner(prev_rank=None, next_rank=1, hidden_shape=lambda i: (2,), device=torch.device("cpu"))
    try:
        comm.set_send_delays({1: 0.2})
        start = time.perf_counter()
        runner._send(torch.ones(2), 1)
        runner._send(torch.ones(2), 3)  # another peer: not delayed
        comm.set_send_delays({})
        runner._send(torch.ones(2), 1)
    finally:
        comm.set_send_delays({})
    assert [d for d, _ in posted] == [1, 3, 1]
    assert posted[0][1] - start >= 0.2 and posted[1][1] - posted[0][1] < 0.1 and posted[2][1] - posted[1][1] < 0.1
