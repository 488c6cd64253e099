"""Slot planning: one job per GPU, CPU slots share the cores (logic tested without GPUs)."""

import os
import subprocess
import sys

import pytest

from caikit_tuning.runtime.worker_pool import (
    Slot,
    WorkerPoolSettings,
    allocator_library,
    plan_slots,
)
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


def test_workers_get_the_allocator_unless_the_server_was_given_one():
    slot = plan_slots([], 1, gpu_count=0, cpu_count=2, preload="libtcmalloc_minimal.so.4")[0]
    assert slot.environment({})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert slot.environment({"LD_PRELOAD": "libjemalloc.so.2"})["LD_PRELOAD"] == "libjemalloc.so.2"
    gpu = plan_slots("auto", 1, gpu_count=1, cpu_count=2, preload="libtcmalloc_minimal.so.4")[0]
    assert gpu.environment({})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert "LD_PRELOAD" not in plan_slots([], 1, gpu_count=0, cpu_count=2)[0].environment({})


def test_an_unknown_allocator_is_refused_by_name():
    assert allocator_library("system") is None
    with pytest.raises(ValueError, match="`allocator` must be one of"):
        WorkerPoolSettings(allocator="jemalloc")


@pytest.mark.skipif(allocator_library("tcmalloc") is None, reason="tcmalloc is not installed")
def test_a_worker_environment_runs_torch_on_tcmalloc():
    """A real process started with a slot's environment has tcmalloc mapped and trains."""
    slot = plan_slots([], 1, gpu_count=0, cpu_count=2, preload=allocator_library("tcmalloc"))[0]
    script = (
        "import torch\n"
        "x = torch.randn(256, 64, requires_grad=True)\n"
        "(x @ x.T).sum().backward()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('tcmalloc' in maps, bool(torch.isfinite(x.grad).all()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=slot.environment(dict(os.environ, LD_PRELOAD="")),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["True", "True"]
