"""Slot planning: one job per GPU, CPU slots share the cores (logic tested without GPUs)."""

import pytest

from caikit_tuning.runtime.worker_pool import Slot, plan_slots
from caikit_tuning.training.core_share import sees_the_whole_machine


def test_one_slot_per_visible_gpu():
    slots = plan_slots("auto", cpu_slots=3, gpu_count=2, cpu_count=16)
    assert slots == [Slot("cuda", 0), Slot("cuda", 1)]
    assert slots[1].environment({"PATH": "/bin"}) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1"}


def test_explicit_gpu_list():
    assert [s.index for s in plan_slots([2, 5], 1, gpu_count=8, cpu_count=8)] == [2, 5]


def test_cpu_slots_split_the_cores_and_hide_gpus():
    slots = plan_slots("auto", cpu_slots=2, gpu_count=0, cpu_count=8)
    assert slots == [Slot("cpu", 0, 4), Slot("cpu", 1, 4)]
    # Its threads make room for the server's where /proc/stat shows the cores it runs on.
    sharing = {"CAIKIT_TUNING_SHARE_CORES": "1"} if sees_the_whole_machine() else {}
    assert slots[0].environment({}) == {
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "4",
        **sharing,
    }


def test_forcing_cpu_on_a_gpu_machine():
    assert plan_slots([], cpu_slots=1, gpu_count=4, cpu_count=2) == [Slot("cpu", 0, 2)]


def test_no_slots_is_an_error():
    with pytest.raises(ValueError, match="`cpu_slots` must be >= 1"):
        plan_slots([], cpu_slots=0, gpu_count=0, cpu_count=2)
