"""Worker slots and the GPUs they name (the slot -> device map).

A slot is where one worker runs; on a GPU host it names its device(s) explicitly: the
value of CUDA_VISIBLE_DEVICES its workers get (``"0"``, ``"2,3"``; ``""`` = no GPU). The
agent publishes the map in its NodeRecord (``slot_devices``; `tenax nodes --json`).

    no flag                 one slot per GPU NVML finds (slot i -> GPU i); on a host without
                            GPUs ``--cpu-slots`` slots (default 1) with no device
    --gpus-per-slot N       one slot per N GPUs (slot i -> GPUs iN .. iN+N-1)
    --slot-devices MAP      explicit: ``0;0;1;1`` (two slots share each GPU), ``0,1;2,3``
    --slots N               N slots: on a GPU host N must match what the GPUs give (or give a
                            --slot-devices map); never a slot that points at a missing GPU
"""

from __future__ import annotations

import re

_DEVICES_RE = re.compile(r"^[0-9]{1,3}(,[0-9]{1,3})*$")


def parse_slot_devices(text: str) -> list[str]:
    """``"0;0;1,2"`` -> ``["0", "0", "1,2"]``; ValueError naming --slot-devices. Pure."""
    slots = [part.strip() for part in text.split(";")]
    for i, part in enumerate(slots):
        if not _DEVICES_RE.match(part):
            raise ValueError(f"--slot-devices: slot {i} must be GPU indices like 0 or 0,1 "
                             f"(slots separated by ';'), got {part!r}")
    return slots


def slot_devices(*, gpus: int, slots: int | None = None, gpus_per_slot: int = 1, explicit: str = "",
                 cpu_slots: int = 1) -> list[str]:
    """Slot i -> its CUDA_VISIBLE_DEVICES value, from the GPUs NVML finds and the flags. Pure;
    ValueError names the flag that cannot be honoured."""
    if gpus_per_slot < 1:
        raise ValueError(f"--gpus-per-slot must be >= 1, got {gpus_per_slot}")
    if cpu_slots < 0:
        raise ValueError(f"--cpu-slots must be >= 0, got {cpu_slots}")
    if explicit:
        mapping = parse_slot_devices(explicit)
        missing = sorted({int(d) for part in mapping for d in part.split(",")} - set(range(gpus)))
        if missing:
            raise ValueError(f"--slot-devices names GPU(s) {missing}, but NVML finds {gpus} GPU(s)")
        if slots is not None and slots != len(mapping):
            raise ValueError(f"--slots {slots} disagrees with --slot-devices ({len(mapping)} slots)")
        return mapping
    if gpus == 0:
        return [""] * (cpu_slots if slots is None else slots)
    usable = gpus // gpus_per_slot
    if usable == 0:
        raise ValueError(f"--gpus-per-slot {gpus_per_slot} needs at least that many GPUs; NVML finds {gpus}")
    if slots is not None and slots != usable:
        raise ValueError(f"--slots {slots}, but {gpus} GPU(s) at {gpus_per_slot} per slot give {usable} slot(s); "
                         f"to share GPUs between slots name them: --slot-devices (e.g. "
                         f"{';'.join(str(i % gpus) for i in range(slots))})")
    return [",".join(str(i * gpus_per_slot + k) for k in range(gpus_per_slot)) for i in range(usable)]


def visible_devices(device: str, slot: int, devices: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for a worker on ``slot``: its slot's GPUs for a CUDA job, none for a CPU
    job (it must not grab a GPU of the host). Pure."""
    if device != "cuda":
        return ""
    return devices[slot] if 0 <= slot < len(devices) else ""
