"""Waiting for the GPU memory of a process that is exiting on the same device.

When two ranks share a GPU (one GPU per host in tests and benchmarks, or a replacement
started where a worker died) and one of them is killed, the survivor hears of it within a
second (agent/lifeline.py), but the dead process's GPU memory is freed only at the end of its
teardown, seconds later for a large rank. A recovery that allocates before then fails with a
CUDA out-of-memory error that has nothing to do with the model. So before a recovering rank
allocates, it waits (bounded) until no process on its device is still tearing down.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from common.procexit import is_tearing_down

log = logging.getLogger("tenax.trainer.gpu_release")


def _cuda_uuid(device) -> str:
    """NVML's UUID (``GPU-...``) of a CUDA torch.device."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


@contextmanager
def device_pids(device, *, nvml=None,
                uuid_of: Callable[[Any], str] = _cuda_uuid) -> Iterator[Callable[[], list[int] | None]]:
    """NVML open for one wait: yields a reader of the PIDs with a context on ``device`` (a CUDA
    torch.device), called on every poll; NVML is initialised once here and shut down on exit.
    The reader returns None when NVML or the device cannot be read (then nothing is waited
    for). ``nvml``: the pynvml module (a fake in tests); ``uuid_of``: device -> NVML UUID."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as exc:  # no NVML, no driver, an old library: no GPU telemetry, never a crash
        log.debug("NVML not available: %r", exc)
        nvml = None
    if nvml is None:
        yield lambda: None
        return
    try:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid_of(device))
        except Exception as exc:
            log.debug("GPU %s not found by NVML: %r", device, exc)
            handle = None
        yield (lambda: _pids_on(nvml, handle)) if handle is not None else (lambda: None)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("NVML shutdown failed: %r", exc)


def _pids_on(nvml, handle) -> list[int] | None:
    try:
        procs = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        procs += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    except Exception as exc:
        log.debug("GPU processes not readable: %r", exc)
        return None
    return [p.pid for p in procs]


def wait_for_exiting_neighbours(pids: Callable[[], Iterable[int] | None], *, timeout_s: float,
                                poll_s: float = 0.02, me: int | None = None,
                                tearing_down: Callable[[int], bool] = is_tearing_down,
                                clock: Callable[[], float] = time.monotonic,
                                sleep: Callable[[float], None] = time.sleep) -> tuple[float, list[int]]:
    """Wait until no process of ``pids()`` (other than ``me``) is tearing down, at most
    ``timeout_s``; (seconds waited, the PIDs still tearing down when it gave up, else [])."""
    me = os.getpid() if me is None else me
    start = clock()
    while True:
        listed = pids()
        exiting = [p for p in (listed or ()) if p != me and tearing_down(p)]
        waited = clock() - start
        if not exiting:
            return waited, []
        if waited >= timeout_s:
            log.warning("processes %s on this GPU still exiting after %.1f s; allocating anyway", exiting, waited)
            return waited, exiting
        sleep(poll_s)
