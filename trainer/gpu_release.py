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
from typing import Callable, Iterable

from common.procexit import is_tearing_down

log = logging.getLogger("tenax.trainer.gpu_release")


def device_pids(device) -> list[int] | None:
    """PIDs with a context on ``device`` (a CUDA torch.device), from NVML; None when NVML or
    the device cannot be read (then nothing is waited for)."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
            procs += list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
            return [p.pid for p in procs]
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML, no driver, an old library: no GPU telemetry, never a crash
        log.debug("GPU processes not readable: %r", exc)
        return None


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
