"""Node telemetry: host (psutil) and GPU (NVML) samples, and the node condition.

The GPU source is an interface (``GpuSource``) so the agent can run with the
real NVML (``NvmlSource``), with no GPUs at all (``NoGpuSource``) or with a
scripted fake in tests (``FakeGpuSource``). A host without NVML or without a
GPU gets ``NoGpuSource``: no GPU telemetry, never a crash.

The node condition is a pure function of the latest GPU samples
(``node_condition``):

* FAILED   — an XID error in the fatal set, any volatile double-bit ECC error, or
             a row remapping failure (no spare rows left)
* DEGRADED — any other XID error, retired pages or remapped rows pending (need a
             reset), thermal or power throttling, PCIe replays growing past a
             threshold, NVLink CRC/replay/recovery errors
* HEALTHY  — otherwise (also when there are no GPUs)

Tests and game days inject GPU telemetry without a GPU: ``tenax agent
--fake-gpu-dir DIR`` (``AgentSettings.fake_gpu_dir``) selects ``FileGpuSource``, which reads ``<dir>/<node id>.json`` (a JSON list of
GpuSample fields) at every sample; no file means no GPUs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent import metrics

log = logging.getLogger(__name__)

HEALTHY = "HEALTHY"
DEGRADED = "DEGRADED"
FAILED = "FAILED"

# XIDs that mean the GPU (or its memory) cannot be trusted any more: 48 double-bit
# ECC, 63/64 row remapping, 74 NVLink, 79 fell off the bus, 92 high SBE rate,
# 94/95 contained/uncontained ECC, 119/120 GSP errors.
FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})

# Throttle reasons that mean the GPU runs slower than it should (NVML bit masks):
# SW power cap, HW slowdown, SW thermal, HW thermal, HW power brake.
THROTTLE_BITS = {
    0x0000000000000004: "sw_power_cap",
    0x0000000000000008: "hw_slowdown",
    0x0000000000000020: "sw_thermal",
    0x0000000000000040: "hw_thermal",
    0x0000000000000080: "hw_power_brake",
}


@dataclass(kw_only=True)
class GpuSample:
    """One GPU at one time. Field names follow tenax.v1.GpuHealth."""

    index: int
    name: str = ""
    utilization: float = 0.0
    """Percent (0-100)."""
    memory_used: int = 0
    """Bytes."""
    memory_total: int = 0
    """Bytes."""
    temperature_c: float = 0.0
    power_w: float = 0.0
    sm_clock_mhz: float = 0.0
    throttle_reasons: list[str] = field(default_factory=list)
    ecc_volatile_dbe: int = 0
    retired_pages: int = 0
    """Pages pending retirement (needs a GPU reset)."""
    xid_events: list[int] = field(default_factory=list)
    """XID error codes seen on this GPU since the agent started (the latest 16): a GPU
    that reported a fatal XID stays FAILED until it is reset and the agent restarts."""
    remapped_rows_pending: int = 0
    """1 if row remappings are pending (the GPU needs a reset to apply them), else 0."""
    remapped_rows_failed: int = 0
    """1 if a row remapping failed (no spare rows: the memory cannot be repaired), else 0."""
    pcie_replay_errors: int = 0
    """PCIe replay counter (cumulative since boot)."""
    nvlink_errors: int = 0
    """Sum of NVLink CRC, replay and recovery error counters over all links (cumulative)."""
    xid_total: int = 0
    """XID events seen on this GPU since the agent started, all of them (``xid_events`` keeps
    the latest 16 codes only)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def xid_count(self) -> int:
        """How many XIDs this GPU reported since the agent started (a source that only lists
        codes, like a fake GPU file, counts its list)."""
        return max(self.xid_total, len(self.xid_events))


@dataclass(kw_only=True)
class HostSample:
    cpu_percent: float
    memory_used: int
    """Bytes."""
    memory_total: int
    """Bytes."""


class GpuSource(Protocol):
    def device_count(self) -> int: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class NoGpuSource:
    """A host without GPUs (or without a working NVML)."""

    def device_count(self) -> int:
        return 0

    def sample(self) -> list[GpuSample]:
        return []

    def close(self) -> None:
        pass


class FakeGpuSource:
    """A scripted GPU source for tests: set ``gpus`` to what the next sample returns."""

    def __init__(self, gpus: list[GpuSample] | None = None) -> None:
        self.gpus = list(gpus or [])

    def device_count(self) -> int:
        return len(self.gpus)

    def sample(self) -> list[GpuSample]:
        return [GpuSample(**g.to_dict()) for g in self.gpus]

    def close(self) -> None:
        pass


class FileGpuSource:
    """GPU telemetry read from a JSON file at every sample (``--fake-gpu-dir``): lets a test
    inject XID or ECC errors into a running agent. A missing or malformed file reads as no GPUs
    (the previous sample is kept when the file is being rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last: list[GpuSample] = []

    def device_count(self) -> int:
        return len(self.sample())

    def sample(self) -> list[GpuSample]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            self._last = []
            return []
        except (OSError, ValueError) as exc:
            log.warning("fake GPU file %s unreadable (keeping the last sample): %r", self.path, exc)
            return [GpuSample(**g.to_dict()) for g in self._last]
        gpus = []
        for i, item in enumerate(raw if isinstance(raw, list) else []):
            if isinstance(item, dict):
                known = {k: v for k, v in item.items() if k in GpuSample.__dataclass_fields__}
                try:
                    gpus.append(GpuSample(**{"index": i, **known}))
                except TypeError as exc:
                    log.warning("fake GPU %d in %s skipped: %r", i, self.path, exc)
        self._last = gpus
        return [GpuSample(**g.to_dict()) for g in gpus]

    def close(self) -> None:
        pass


class NvmlSource:
    """The real NVML through ``pynvml`` (package nvidia-ml-py).

    Each reading is optional: a GPU or driver that does not support one (ECC on
    consumer parts, XID events in containers) leaves that field at its default.
    """

    def __init__(self) -> None:
        import pynvml  # only here: hosts without the library still run the agent

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._event_set = None
        self._xid_history: dict[int, list[int]] = {}
        self._xid_totals: dict[int, int] = {}
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
            for h in self._handles:
                pynvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, self._event_set)
        except Exception as exc:  # not supported (e.g. in some containers): no XID events
            log.info("NVML XID events unavailable: %r", exc)
            self._event_set = None

    def device_count(self) -> int:
        return len(self._handles)

    def _read(self, what: str, fn, *args, default=None):
        try:
            return fn(*args)
        except Exception as exc:
            log.debug("NVML %s unavailable: %r", what, exc)
            return default

    def _xids(self) -> dict[int, list[int]]:
        found = self._xid_history
        if self._event_set is None:
            return found
        nv = self._nvml
        for _ in range(64):  # drain what is queued; timeout 0 never blocks
            try:
                data = nv.nvmlEventSetWait_v2(self._event_set, 0)
            except Exception:
                break
            index = next((i for i, h in enumerate(self._handles) if h.value == data.device.value), -1) \
                if hasattr(data.device, "value") else -1
            history = found.setdefault(index, [])
            history.append(int(data.eventData))
            self._xid_totals[index] = self._xid_totals.get(index, 0) + 1
            del history[:-16]
        return found

    def sample(self) -> list[GpuSample]:
        nv = self._nvml
        xids = self._xids()
        out = []
        for i, h in enumerate(self._handles):
            util = self._read("utilization", nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._read("memory", nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = self._read("power", nv.nvmlDeviceGetPowerUsage, h, default=0)
            throttle = self._read("throttle", nv.nvmlDeviceGetCurrentClocksThrottleReasons, h, default=0)
            dbe = self._read("ecc", nv.nvmlDeviceGetTotalEccErrors, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                             nv.NVML_VOLATILE_ECC, default=0)
            pending = self._read("retired pages", nv.nvmlDeviceGetRetiredPagesPendingStatus, h, default=0)
            name = self._read("name", nv.nvmlDeviceGetName, h, default="")
            remap = self._read("row remapping", nv.nvmlDeviceGetRemappedRows, h, default=None)
            pcie_replays = self._read("pcie replays", nv.nvmlDeviceGetPcieReplayCounter, h, default=0)
            out.append(GpuSample(
                index=i,
                name=name.decode() if isinstance(name, bytes) else str(name),
                utilization=float(util.gpu) if util else 0.0,
                memory_used=int(mem.used) if mem else 0,
                memory_total=int(mem.total) if mem else 0,
                temperature_c=float(self._read("temperature", nv.nvmlDeviceGetTemperature, h,
                                               nv.NVML_TEMPERATURE_GPU, default=0)),
                power_w=float(power_mw) / 1000.0,
                sm_clock_mhz=float(self._read("clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM, default=0)),
                throttle_reasons=throttle_names(int(throttle or 0)),
                ecc_volatile_dbe=int(dbe or 0),
                retired_pages=int(bool(pending)),
                xid_events=list(xids.get(i, [])),
                # (correctable rows, uncorrectable rows, pending, failure) on Ampere and later
                remapped_rows_pending=int(bool(remap[2])) if remap and len(remap) >= 4 else 0,
                remapped_rows_failed=int(bool(remap[3])) if remap and len(remap) >= 4 else 0,
                pcie_replay_errors=int(pcie_replays or 0),
                nvlink_errors=self._nvlink_errors(h),
                xid_total=self._xid_totals.get(i, 0),
            ))
        return out

    def _nvlink_errors(self, handle) -> int:
        """CRC + replay + recovery error counters summed over the links (0 where there is no NVLink)."""
        nv = self._nvml
        counters = [getattr(nv, name, None) for name in ("NVML_NVLINK_ERROR_DL_CRC_FLIT", "NVML_NVLINK_ERROR_DL_REPLAY",
                                                          "NVML_NVLINK_ERROR_DL_RECOVERY")]
        max_links = getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)
        total = 0
        for link in range(max_links):
            state = self._read("nvlink state", nv.nvmlDeviceGetNvLinkState, handle, link, default=None)
            if not state:
                continue  # link absent or down; absent links raise, which _read turns into None
            for counter in counters:
                if counter is not None:
                    total += int(self._read("nvlink errors", nv.nvmlDeviceGetNvLinkErrorCounter, handle, link,
                                            counter, default=0) or 0)
        return total

    def close(self) -> None:
        try:
            if self._event_set is not None:
                self._nvml.nvmlEventSetFree(self._event_set)
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("NVML shutdown: %r", exc)


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def open_gpu_source(node_id: str = "", fake_gpu_dir: Path | None = None) -> GpuSource:
    """``FileGpuSource`` reading ``<fake_gpu_dir>/<node id>.json`` when ``fake_gpu_dir`` is given
    (tests, game days); else NVML when it works and sees at least one GPU; otherwise no GPUs."""
    if fake_gpu_dir is not None:
        log.warning("GPU telemetry from %s (--fake-gpu-dir), not NVML", fake_gpu_dir)
        return FileGpuSource(Path(fake_gpu_dir) / f"{node_id or 'node'}.json")
    try:
        source = NvmlSource()
    except Exception as exc:  # no library, no driver, no device
        log.info("no NVML (%s): no GPU telemetry", exc.__class__.__name__)
        return NoGpuSource()
    if source.device_count() == 0:
        source.close()
        return NoGpuSource()
    return source


def sample_host() -> HostSample:
    vm = psutil.virtual_memory()
    # interval=None: utilization since the previous call, never blocks.
    return HostSample(cpu_percent=float(psutil.cpu_percent(interval=None)),
                      memory_used=int(vm.total - vm.available), memory_total=int(vm.total))


# ------------------------------------------------------------------ decisions
PCIE_REPLAY_DEGRADED = 100
"""PCIe replays (cumulative) at which a GPU counts as DEGRADED: a few replays are normal,
a steady stream means a bad link or riser that slows every transfer."""


def gpu_condition(gpu: GpuSample) -> tuple[str, str]:
    """(condition, reason) of one GPU sample."""
    fatal = sorted(set(gpu.xid_events) & FATAL_XIDS)
    if fatal:
        return FAILED, f"gpu {gpu.index}: XID {fatal[0]}"
    if gpu.ecc_volatile_dbe > 0:
        return FAILED, f"gpu {gpu.index}: {gpu.ecc_volatile_dbe} volatile double-bit ECC errors"
    if gpu.remapped_rows_failed:
        return FAILED, f"gpu {gpu.index}: row remapping failed (no spare rows)"
    if gpu.xid_events:
        return DEGRADED, f"gpu {gpu.index}: XID {sorted(set(gpu.xid_events))[0]}"
    if gpu.retired_pages > 0:
        return DEGRADED, f"gpu {gpu.index}: retired pages pending"
    if gpu.remapped_rows_pending:
        return DEGRADED, f"gpu {gpu.index}: remapped rows pending (needs a reset)"
    if gpu.nvlink_errors > 0:
        return DEGRADED, f"gpu {gpu.index}: {gpu.nvlink_errors} NVLink errors"
    if gpu.pcie_replay_errors >= PCIE_REPLAY_DEGRADED:
        return DEGRADED, f"gpu {gpu.index}: {gpu.pcie_replay_errors} PCIe replays"
    if gpu.throttle_reasons:
        return DEGRADED, f"gpu {gpu.index}: throttled ({', '.join(gpu.throttle_reasons)})"
    return HEALTHY, ""


_SEVERITY = {HEALTHY: 0, DEGRADED: 1, FAILED: 2}


def node_condition(gpus: list[GpuSample]) -> tuple[str, str]:
    """(condition, reason) of a node: the worst of its GPUs; HEALTHY without GPUs."""
    worst = (HEALTHY, "")
    for gpu in gpus:
        cond = gpu_condition(gpu)
        if _SEVERITY[cond[0]] > _SEVERITY[worst[0]]:
            worst = cond
    return worst


# ------------------------------------------------------------------ publishing
def health_record(host: HostSample, gpus: list[GpuSample], now: float) -> dict[str, Any]:
    """The NodeHealth JSON stored at Keys.node_health (tenax.v1.NodeHealth field names)."""
    condition, reason = node_condition(gpus)
    return {
        "cpu_percent": host.cpu_percent,
        "memory_used": host.memory_used,
        "memory_total": host.memory_total,
        "gpus": [g.to_dict() for g in gpus],
        "time": now,
        "condition": condition,
        "condition_reason": reason,
    }


_xids_counted: dict[int, int] = {}


def new_xids(seen: dict[int, int], gpus: list[GpuSample]) -> dict[int, list[int]]:
    """GPU index -> the XID codes it reported since ``seen`` (updated in place). ``xid_events``
    is the latest 16 codes: a count beyond that reads as the newest ones."""
    out = {}
    for gpu in gpus:
        fresh = gpu.xid_count - seen.get(gpu.index, 0)
        if fresh > 0:
            out[gpu.index] = list(gpu.xid_events[-fresh:])
        seen[gpu.index] = gpu.xid_count
    return out


def export_gauges(host: HostSample, gpus: list[GpuSample]) -> None:
    metrics.NODE_CPU_PERCENT.set(host.cpu_percent)
    metrics.NODE_MEMORY_USED.set(host.memory_used)
    metrics.NODE_MEMORY_TOTAL.set(host.memory_total)
    for gpu in gpus:
        label = str(gpu.index)
        metrics.GPU_UTILIZATION.labels(label).set(gpu.utilization)
        metrics.GPU_MEMORY_USED.labels(label).set(gpu.memory_used)
        metrics.GPU_TEMPERATURE.labels(label).set(gpu.temperature_c)
        metrics.GPU_POWER.labels(label).set(gpu.power_w)
        metrics.GPU_SM_CLOCK.labels(label).set(gpu.sm_clock_mhz)
        metrics.GPU_THROTTLED.labels(label).set(1 if gpu.throttle_reasons else 0)
        metrics.GPU_ECC_DBE.labels(label).set(gpu.ecc_volatile_dbe)
        new_xids = gpu.xid_count - _xids_counted.get(gpu.index, 0)
        # inc(0): the series exists at 0 from the first sample, so that increase(...) > 0 sees the
        # first XID (a counter that appears at 1 has no increase to show)
        metrics.GPU_XID_ERRORS.labels(label).inc(max(new_xids, 0))
        _xids_counted[gpu.index] = gpu.xid_count
        metrics.GPU_HEALTHY.labels(label).set(1 if gpu_condition(gpu)[0] == HEALTHY else 0)
    condition, _ = node_condition(gpus)
    for name in (HEALTHY, DEGRADED, FAILED):
        metrics.NODE_CONDITION.labels(name).set(1 if name == condition else 0)

