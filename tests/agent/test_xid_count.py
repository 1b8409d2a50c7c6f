"""XIDs are counted past the 16 codes a sample keeps, and the counter exists at 0."""

from __future__ import annotations

from agent import metrics
from agent.telemetry import GpuSample, HostSample, export_gauges, new_xids

HOST = HostSample(cpu_percent=1.0, memory_used=1, memory_total=2)


def _counter(gpu: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("tenax_gpu_xid_errors_total", {"gpu": gpu})


def test_xid_events_and_the_counter_go_on_past_sixteen():
    seen: dict[int, int] = {}
    codes = [13] * 16
    assert new_xids(seen, [GpuSample(index=7, xid_events=codes, xid_total=16)]) == {7: [13] * 16}
    later = codes[4:] + [79, 79, 79, 79]  # 20 seen, the latest 16 kept
    assert new_xids(seen, [GpuSample(index=7, xid_events=later, xid_total=20)]) == {7: [79, 79, 79, 79]}
    assert new_xids(seen, [GpuSample(index=7, xid_events=later, xid_total=20)]) == {}
    assert new_xids({}, [GpuSample(index=1, xid_events=[31])]) == {1: [31]}  # a list only: its length counts


def test_the_xid_counter_exists_at_zero_and_counts_every_xid():
    export_gauges(HOST, [GpuSample(index=9)])
    assert _counter("9") == 0.0
    export_gauges(HOST, [GpuSample(index=9, xid_events=[13] * 16, xid_total=16)])
    export_gauges(HOST, [GpuSample(index=9, xid_events=[13] * 16, xid_total=21)])
    assert _counter("9") == 21.0
