"""agent/slots.py: slots from the GPUs found, and explicit slot -> device maps."""

from __future__ import annotations

import pytest

from agent.slots import parse_slot_devices, slot_devices, visible_devices


def test_one_slot_per_gpu_by_default_and_cpu_slots_without_gpus():
    assert slot_devices(gpus=4) == ["0", "1", "2", "3"]
    assert slot_devices(gpus=0, cpu_slots=2) == ["", ""]
    assert slot_devices(gpus=0, slots=3) == ["", "", ""]
    assert slot_devices(gpus=4, gpus_per_slot=2) == ["0,1", "2,3"]
    assert slot_devices(gpus=1, slots=1) == ["0"]


def test_never_a_slot_on_a_gpu_that_does_not_exist():
    with pytest.raises(ValueError, match=r"--slots 2, but 1 GPU\(s\).*--slot-devices \(e.g. 0;0\)"):
        slot_devices(gpus=1, slots=2)
    with pytest.raises(ValueError, match=r"--slot-devices names GPU\(s\) \[1\]"):
        slot_devices(gpus=1, explicit="0;1")
    with pytest.raises(ValueError, match="--gpus-per-slot 4 needs"):
        slot_devices(gpus=2, gpus_per_slot=4)


def test_slots_share_a_gpu_only_when_asked():
    assert slot_devices(gpus=1, explicit="0;0") == ["0", "0"]
    assert slot_devices(gpus=2, slots=4, explicit="0;0;1;1") == ["0", "0", "1", "1"]
    with pytest.raises(ValueError, match="disagrees"):
        slot_devices(gpus=2, slots=3, explicit="0;1")
    for bad in ("0;", "a", "0;;1", "0 1", "-1"):
        with pytest.raises(ValueError, match="--slot-devices"):
            parse_slot_devices(bad)


def test_a_cpu_job_sees_no_gpu_and_a_cuda_job_its_slots_devices():
    devices = ["0", "0", "1,2"]
    assert visible_devices("cuda", 1, devices) == "0" and visible_devices("cuda", 2, devices) == "1,2"
    assert visible_devices("cpu", 2, devices) == ""
