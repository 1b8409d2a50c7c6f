"""Flight Recorder (issue #20), real gloo processes: the waiting ranks' dumps, taken on request
while their main threads block, name the stopped rank and what they wait in; the dumps are
PyTorch's format (the standard analyzer reads them)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.flight import analyse
from protos import flight
from trainer import flight as trainer_flight

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waiting_ranks_dump_on_request_and_the_analysis_names_the_stopped_rank(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TORCH_FR_BUFFER_SIZE", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.flight_worker", str(r), str(port), str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for r in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # into their waits
        (tmp_path / "flight").mkdir(exist_ok=True)
        flight.request_file(tmp_path).write_text(json.dumps({"id": "req1", "time": time.time()}))
        directory = flight.dump_dir(tmp_path, "req1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(flight.dump_file(directory, r).exists() for r in (0, 1)):
            time.sleep(0.05)
        assert not flight.dump_file(directory, 2).exists()  # stopped: it cannot answer
        dumps = {r: pickle.loads(flight.dump_file(directory, r).read_bytes()) for r in (0, 1)}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    # the recorder was on (default size) and recorded the three world all-reduces
    assert [e["profiling_name"] for e in dumps[1]["entries"]][:3] == ["gloo:all_reduce"] * 3

    finding, reason = analyse(dumps, missing=[2], hung=[2])
    print(reason)
    assert finding.behind == [2] and finding.silent == [2]
    waits = {w.rank: w for w in finding.waits}
    assert waits[0].source == "flight-recorder" and waits[0].op == "gloo:all_reduce"
    assert waits[0].group_ranks == [0, 2] and waits[0].seq == 1 and waits[0].waiting_for == [2]
    assert waits[1].source == "worker-stack" and waits[1].op == "pipeline receive"
    assert waits[1].peer == 2 and waits[1].waiting_for == [2] and "pipeline_receive" in waits[1].stack_top
    assert "rank [2] behind" in reason or "ranks [2] behind" in reason

    # PyTorch's own analyzer reads the dumps
    out = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(directory),
                          "--prefix", flight.DUMP_PREFIX, "--allow-incomplete-ranks"], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout[-1500:])


def test_analysis_finds_the_rank_that_has_not_reached_the_collective():
    def dump(rank, seqs, pending):
        entries = [{"process_group": ["1", "dp"], "collective_seq_id": s, "profiling_name": "nccl:all_reduce",
                    "retired": not (pending and s == seqs[-1]), "state": "scheduled", "is_p2p": False} for s in seqs]
        return {"entries": entries, "pg_config": {"1": {"ranks": "[0, 1, 2]"}}, "pg_status": {}}

    # rank 3 has a pending entry too, but every member reached it (gloo retires late): not a wait
    finding, reason = analyse({0: dump(0, [1, 2, 3], True), 1: dump(1, [1, 2], False), 2: dump(2, [1, 2, 3], True)},
                              missing=[])
    assert finding.behind == [1] and finding.silent == []
    assert all(w.waiting_for == [1] and w.seq == 3 for w in finding.waits), finding


def test_recorder_size_comes_from_the_launch_variable(monkeypatch):
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE", raising=False)
    assert trainer_flight.enable({}) == flight.DEFAULT_BUFFER_ENTRIES
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE")
    assert trainer_flight.enable({"TENAX_FLIGHT_RECORDER_ENTRIES": "0"}) == 0
    with pytest.raises(ValueError, match="TENAX_FLIGHT_RECORDER_ENTRIES"):
        trainer_flight.buffer_entries({"TENAX_FLIGHT_RECORDER_ENTRIES": "-3"})


def test_step_lines_carry_per_kind_and_per_peer_communication_times(tmp_path):
    from controller.attribution import window_from_steps

    metrics = tmp_path / "m.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "cli.main", "train-local", "--nproc", "2", "--dp", "1", "--pp", "2",
                    "--steps", "3", "--metrics", str(metrics), "--config", str(REPO / "examples/tiny-gpt.yaml")],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=80)
    lines: dict[int, list[dict]] = {}
    for raw in metrics.read_text().splitlines():
        record = json.loads(raw)
        if "step_time" in record:
            lines.setdefault(record["rank"], []).append(record)
    assert sorted(lines) == [0, 1] and all(len(v) == 3 for v in lines.values())
    for rank, records in lines.items():
        peer = 1 - rank
        for record in records:
            comm = record["comm"]
            assert comm["kind"]["pipeline receive"] > 0 and f"pipeline receive|{peer}" in comm["peer"], comm
            assert comm["kind"]["pipeline send"] >= 0, comm
    window = window_from_steps(lines)
    assert set(window[0].receive_wait_s) == {1} and set(window[1].receive_wait_s) == {0}
