"""Telemetry for detection: the NVML readings and their node condition (through a fake
pynvml and the injectable file source), the agent's per-rank timing publisher, and
the worker's step telemetry (fields, heartbeat, error events, chaos slowdown)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.rank_health import (COMM_KEYS, COMM_STEPS, RankHealthPublisher, RankTail, comm_summary, process_stopped,
                               step_timing)
from agent.telemetry import (DEGRADED, FAILED, HEALTHY, FileGpuSource, GpuSample, NvmlSource, gpu_condition,
                             node_condition, open_gpu_source)
from protos.keys import Keys
from trainer.telemetry import StepTelemetry, TelemetrySettings

KEYS = Keys()


# ------------------------------------------------------------------ GPU condition
@pytest.mark.parametrize("fields,condition,words", [
    ({}, HEALTHY, ""),
    ({"xid_events": [13]}, DEGRADED, "XID 13"),
    ({"xid_events": [13, 79]}, FAILED, "XID 79"),
    ({"ecc_volatile_dbe": 1}, FAILED, "double-bit"),
    ({"remapped_rows_failed": 1}, FAILED, "row remapping failed"),
    ({"remapped_rows_pending": 1}, DEGRADED, "remapped rows pending"),
    ({"retired_pages": 1}, DEGRADED, "retired pages"),
    ({"nvlink_errors": 3}, DEGRADED, "NVLink"),
    ({"pcie_replay_errors": 5}, HEALTHY, ""),
    ({"pcie_replay_errors": 250}, DEGRADED, "PCIe replays"),
    ({"throttle_reasons": ["hw_thermal"]}, DEGRADED, "throttled"),
])
def test_gpu_condition_mapping(fields, condition, words):
    cond, reason = gpu_condition(GpuSample(index=0, **fields))
    assert cond == condition and words in reason


def test_file_source_injects_telemetry_into_a_running_agent(tmp_path):
    source = open_gpu_source("node-7", fake_gpu_dir=tmp_path)
    assert isinstance(source, FileGpuSource) and source.sample() == []  # no file: no GPUs
    path = tmp_path / "node-7.json"
    path.write_text(json.dumps([{"name": "H200"}, {"xid_events": [31], "unknown_field": 1}]))
    gpus = source.sample()
    assert [g.index for g in gpus] == [0, 1] and node_condition(gpus) == (DEGRADED, "gpu 1: XID 31")
    path.write_text("[{broken")
    assert node_condition(source.sample())[0] == DEGRADED  # mid-rewrite: the last sample stays
    path.write_text(json.dumps([{"ecc_volatile_dbe": 2}]))
    assert node_condition(source.sample())[0] == FAILED


def fake_pynvml() -> types.ModuleType:
    """Just enough of pynvml for NvmlSource: two GPUs, the second with bad memory and links."""
    nv = types.ModuleType("pynvml")

    class Handle:
        def __init__(self, i):
            self.value = i

    handles = [Handle(0), Handle(1)]
    nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC = 1, 0
    nv.NVML_TEMPERATURE_GPU, nv.NVML_CLOCK_SM = 0, 1
    nv.NVML_NVLINK_ERROR_DL_CRC_FLIT, nv.NVML_NVLINK_ERROR_DL_REPLAY, nv.NVML_NVLINK_ERROR_DL_RECOVERY = 0, 1, 2
    nv.NVML_NVLINK_MAX_LINKS = 4
    nv.nvmlEventTypeXidCriticalError = 8
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: handles[i]
    nv.nvmlEventSetCreate = lambda: object()
    nv.nvmlDeviceRegisterEvents = lambda h, kind, es: None
    events = [SimpleNamespace(device=handles[1], eventData=48)]

    def wait(es, timeout):
        if not events:
            raise RuntimeError("timeout")
        return events.pop()

    nv.nvmlEventSetWait_v2 = wait
    nv.nvmlEventSetFree = lambda es: None
    nv.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=50)
    nv.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=1, total=2)
    nv.nvmlDeviceGetPowerUsage = lambda h: 300_000
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x40 if h.value == 1 else 0
    nv.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: 2 if h.value == 1 else 0
    nv.nvmlDeviceGetRetiredPagesPendingStatus = lambda h: 0
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 40
    nv.nvmlDeviceGetClockInfo = lambda h, clock: 1980
    nv.nvmlDeviceGetRemappedRows = lambda h: (0, 1, 1, 0) if h.value == 1 else (0, 0, 0, 0)
    nv.nvmlDeviceGetPcieReplayCounter = lambda h: 7

    def link_state(h, link):
        if link >= 2:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")  # a link that does not exist
        return 1

    nv.nvmlDeviceGetNvLinkState = link_state
    nv.nvmlDeviceGetNvLinkErrorCounter = lambda h, link, counter: 5 if h.value == 1 and counter == 0 else 0
    return nv


def test_nvml_source_reads_xid_ecc_remapping_pcie_and_nvlink(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    source = NvmlSource()
    healthy, bad = source.sample()
    assert gpu_condition(healthy) == (HEALTHY, "")
    assert (bad.xid_events, bad.ecc_volatile_dbe, bad.remapped_rows_pending, bad.pcie_replay_errors,
            bad.nvlink_errors, bad.throttle_reasons) == ([48], 2, 1, 7, 10, ["hw_thermal"])
    assert node_condition([healthy, bad]) == (FAILED, "gpu 1: XID 48")
    assert bad.name == "NVIDIA H200" and bad.power_w == 300.0
    source.close()


# ------------------------------------------------------------------ agent: rank timings
def test_step_timing_reads_compute_and_falls_back_to_forward_plus_backward():
    assert step_timing({"step": 3, "compute_time": 0.5, "collective_time": 0.2, "step_time": 0.8,
                        "generation": 2}) == [3, 0.5, 0.2, 0.8, 2]
    assert step_timing({"step": 1, "forward_time": 0.1, "backward_time": 0.2})[1] == pytest.approx(0.3)
    assert step_timing({"heartbeat": 1.0}) is None
    assert step_timing({"step": True, "compute_time": 1}) is None
    assert step_timing({"step": 2}) is None


def test_rank_tail_reads_whole_lines_heartbeats_and_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"heartbeat": 5.0, "phase": "collective", "step_in_progress": 0}\n{"step": 1, "compu')
    tail = RankTail(job="j", rank=0, pid=1, generation=1, path=path, offset=0, started=1.0)
    assert tail.read_new_lines() and tail.phase == "collective" and tail.heartbeat_at == 5.0 and tail.step == 0
    with open(path, "ab") as f:
        f.write(b'te_time": 0.4, "step_time": 0.5, "generation": 1, "time": 6.0}\nnot json\n')
    tail.read_new_lines()
    summary = tail.summary(stopped=False)
    assert summary["steps"] == [[1, 0.4, 0.0, 0.5, 1]] and summary["progress_at"] == 6.0
    assert summary["heartbeat_at"] == 6.0 and summary["stopped"] is False


def test_comm_summary_is_medians_of_the_newest_generation_rounded_and_bounded(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = []
    for step in range(1, 41):
        generation = 1 if step <= 5 else 2
        peer = {"pipeline receive|1": 0.5 if step % 2 else 0.3, "pipeline receive|3": 0.0123456}
        if step % 3 == 0:
            peer.pop("pipeline receive|3")  # a step without it waited 0 there
        peer.update({f"pipeline receive|{p}": 0.001 * p for p in range(10, 10 + COMM_KEYS)})
        lines.append({"step": step, "compute_time": 0.2 + 0.001 * step, "step_time": 1.0, "generation": generation,
                      "time": float(step), "comm": {"kind": {"gradient all-reduce": 0.05, "pipeline receive": 0.4},
                                                    "peer": peer}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tail = RankTail(job="j", rank=2, pid=1, generation=2, path=path, offset=0, started=1.0)
    tail.read_new_lines()
    comm = tail.summary(stopped=False)["comm"]
    assert comm["n"] == COMM_STEPS and comm["generation"] == 2
    assert comm["compute"] == round(0.2 + 0.001 * 30.5, 4)  # median of steps 21..40
    assert comm["kind"] == {"gradient all-reduce": 0.05, "pipeline receive": 0.4}
    assert comm["peer"]["pipeline receive|1"] == 0.4 and comm["peer"]["pipeline receive|3"] == 0.0123
    assert len(comm["peer"]) == COMM_KEYS  # the smallest waits left out
    assert "pipeline receive|10" not in comm["peer"]
    assert len(json.dumps(comm)) < 600
    # only the newest generation's steps; nothing without samples
    assert comm_summary([(1, 0.1, {"kind": {"a": 1.0}}), (2, 0.2, {"kind": {"b": 0.5}})])["kind"] == {"b": 0.5}
    assert comm_summary([]) is None


def test_rank_tail_relays_the_newest_rendezvous_arrival_and_the_startup(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"event": "rendezvous", "generation": 1, "rank": 0, "time": 3.0, "startup_s": 2.5})
                    + "\n")
    tail = RankTail(job="j", rank=0, pid=1, generation=1, path=path, offset=0, started=0.5)
    assert tail.read_new_lines()
    summary = tail.summary(stopped=False)
    assert (summary["arrived"], summary["arrived_at"], summary["startup_s"]) == (1, 3.0, 2.5)
    assert summary["steps"] == [] and summary["step"] == 0  # an arrival is not a step
    with open(path, "a") as out:  # a later generation: no start-up (measured once per process)
        out.write(json.dumps({"event": "rendezvous", "generation": 3, "rank": 1, "time": 9.0}) + "\n")
        out.write(json.dumps({"event": "rendezvous", "generation": 2, "rank": 1, "time": 10.0}) + "\n")
    tail.read_new_lines()
    summary = tail.summary(stopped=False)
    assert (summary["arrived"], summary["arrived_at"], summary["startup_s"]) == (3, 9.0, 2.5)


def test_publisher_reads_a_new_worker_from_where_its_file_ended_at_spawn(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    path.write_text('{"step": 7, "compute_time": 9.0, "generation": 1}\n')  # a previous process's line
    spawned_at = path.stat().st_size
    with open(path, "a") as out:  # the new process arrived before the publisher first looked
        out.write(json.dumps({"event": "rendezvous", "generation": 2, "rank": 0, "time": 4.0, "startup_s": 3.0})
                  + "\n")
    worker = SimpleNamespace(pid=os.getpid(), alive=True, generation=2, metrics_path=path, started=1.0,
                             metrics_offset=spawned_at)
    etcd = RecordingEtcd()
    pub = RankHealthPublisher(etcd=etcd, keys=KEYS, node_id="n0", supervisor=SimpleNamespace(
        workers={("j", 0): worker}), interval_s=0.1)
    asyncio.run(pub.tick())
    rank = etcd.puts[-1][1]["ranks"]["0"]
    assert (rank["arrived"], rank["startup_s"], rank["steps"]) == (2, 3.0, [])


def test_process_stopped_reads_the_kernel_state():
    assert process_stopped(os.getpid()) is False
    assert process_stopped(2 ** 22 + 12345) is None


class RecordingEtcd:
    def __init__(self):
        self.puts, self.deletes = [], []

    async def put(self, key, value, **_):
        self.puts.append((key, json.loads(value)))
        return 1

    async def delete(self, key):
        self.deletes.append(key)
        return True


def test_publisher_writes_one_key_per_job_and_node_only_when_something_changed(tmp_path):
    files = {r: tmp_path / f"rank-{r}.jsonl" for r in (0, 1)}
    for f in files.values():
        f.write_text('{"step": 1, "compute_time": 9.0}\n')  # written before the publisher saw the worker
    workers = {("j", r): SimpleNamespace(pid=os.getpid(), alive=True, generation=1, metrics_path=files[r],
                                         started=1.0) for r in (0, 1)}
    supervisor = SimpleNamespace(workers=workers)
    etcd = RecordingEtcd()
    pub = RankHealthPublisher(etcd=etcd, keys=KEYS, node_id="n0", supervisor=supervisor, interval_s=0.1)

    async def scenario():
        await pub.tick()
        for r, f in files.items():
            with open(f, "a") as out:
                out.write(json.dumps({"step": 2, "compute_time": 0.1 * (r + 1), "step_time": 0.3,
                                      "generation": 1, "time": 10.0}) + "\n")
        await pub.tick()
        await pub.tick()  # nothing new: no write
        workers.clear()
        await pub.tick()  # the job's workers are gone: its key goes too

    asyncio.run(scenario())
    assert [k for k, _ in etcd.puts] == [KEYS.job_telemetry_node("j", "n0")] * 2
    latest = etcd.puts[-1][1]
    assert latest["node"] == "n0" and sorted(latest["ranks"]) == ["0", "1"]
    assert latest["ranks"]["1"]["steps"] == [[2, 0.2, 0.0, 0.3, 1]]  # the old line was skipped
    assert latest["ranks"]["0"]["stopped"] is False
    assert etcd.deletes == [KEYS.job_telemetry_node("j", "n0")]


# ------------------------------------------------------------------ worker: step telemetry
def test_step_telemetry_fields_heartbeats_and_error_events(tmp_path):
    lines: list[dict] = []
    telemetry = StepTelemetry(device_type="cpu", rank=3, write=lines.append,
                              settings=TelemetrySettings(heartbeat_s=0.02, control_dir=str(tmp_path)))
    with telemetry.step(0):
        telemetry.data_started()
        telemetry.data_done()
        telemetry.mark("collective")
        time.sleep(0.15)  # a long collective: the heartbeat thread keeps reporting
    fields = telemetry.fields(forward_s=0.1, backward_s=0.2)
    assert fields["compute_time"] == pytest.approx(0.3) and fields["data_time"] >= 0 and fields["slow_factor"] == 1.0
    beats = [line for line in lines if "heartbeat" in line]
    assert beats and all(b["phase"] == "collective" and b["step_in_progress"] == 0 and b["rank"] == 3 for b in beats)
    assert all("step" not in b for b in beats)  # the progress relay must not take them for steps

    with pytest.raises(RuntimeError):
        with telemetry.step(1):
            telemetry.mark("collective")
            raise RuntimeError("Connection closed by peer")
    [error] = [line for line in lines if line.get("event") == "step_error"]
    assert error["collective"] is True and error["step"] == 1 and "Connection closed" in error["error"]
    telemetry.close()


def test_chaos_slowdown_stretches_compute_by_the_factor(tmp_path):
    telemetry = StepTelemetry(device_type="cpu", rank=0, write=lambda line: None,
                              settings=TelemetrySettings(control_dir=str(tmp_path)))
    assert telemetry.apply_slowdown(0.05) == 0.0
    (tmp_path / "chaos-rank-0.json").write_text(json.dumps({"slow_factor": 2.0}))
    start = time.perf_counter()
    assert telemetry.apply_slowdown(0.05) == pytest.approx(0.05)
    assert time.perf_counter() - start >= 0.05
    (tmp_path / "chaos-rank-0.json").write_text(json.dumps({"slow_factor": 1000}))  # nonsense: ignored
    assert telemetry.apply_slowdown(0.05) == 0.0
    telemetry.close()


def test_telemetry_off_adds_nothing(tmp_path):
    lines: list[dict] = []
    settings = TelemetrySettings.from_env({"TENAX_TELEMETRY": "0", "TENAX_RUN_DIR": str(tmp_path)})
    telemetry = StepTelemetry(device_type="cpu", rank=0, write=lines.append, settings=settings)
    (Path(tmp_path) / "chaos-rank-0.json").write_text(json.dumps({"slow_factor": 2.0}))
    with telemetry.step(0):
        assert telemetry.apply_slowdown(1.0) == 0.0
    assert telemetry.fields(forward_s=1, backward_s=1) == {} and lines == []
    with pytest.raises(ValueError):
        TelemetrySettings.from_env({"TENAX_TELEMETRY": "yes"})
