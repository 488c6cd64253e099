import json

import pytest
import torch

from caikit_tuning.training import autocast_dtype, devices, resolve_device, resolve_dtype


def test_cpu_defaults():
    cpu = resolve_device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16


def test_gpu_dtype_logic_without_a_gpu(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)
    assert resolve_dtype(None, cuda) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert autocast_dtype(cuda, torch.float32) == torch.bfloat16
    assert autocast_dtype(cuda, torch.bfloat16) is None
    monkeypatch.setattr(devices, "bf16_supported", lambda device: False)
    assert resolve_dtype(None, cuda) == torch.float16
    with pytest.raises(ValueError, match="bfloat16 is not supported by this GPU"):
        resolve_dtype("bfloat16", cuda)


def test_auto_device_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None).type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None).type == "cpu"


@pytest.mark.parametrize(
    ("preset", "command", "expected"),
    [
        # Training on its own (any process that is not a server) keeps libgomp's default.
        ({}, ["-c", "..."], ["None", "None"]),
        # A server spins briefly.
        ({}, ["-m", "caikit_tuning.runtime"], ["1000", "None"]),
        ({}, ["/venv/bin/caikit-tuning", "serve"], ["1000", "None"]),
        # Explicit settings win.
        ({"OMP_WAIT_POLICY": "PASSIVE"}, ["-m", "caikit.runtime"], ["None", "PASSIVE"]),
        ({"GOMP_SPINCOUNT": "5"}, ["-m", "caikit.runtime"], ["5", "None"]),
    ],
)
def test_openmp_spin_is_short_only_in_a_server(preset, command, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        f"import sys; sys.orig_argv[1:] = {command!r}; import os, caikit_tuning; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True
    )
    assert out.stdout.split() == expected, out.stderr


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # The spin the server chose: its CPU workers go back to libgomp's default (where
        # they can share the cores, see core_share)...
        ({}, {"cpu": None, "cuda": "1000"}),
        # ...but not one the user set.
        ({"GOMP_SPINCOUNT": "1000"}, {"cpu": "1000", "cuda": "1000"}),
    ],
)
def test_a_servers_cpu_workers_keep_the_default_spin(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import sys; sys.orig_argv[1:] = ['-m', 'caikit_tuning.runtime']; import os, json; "
        "from caikit_tuning.runtime.worker_pool import Slot; "
        "print(json.dumps({k: Slot(k, 0, 2).environment(dict(os.environ)).get('GOMP_SPINCOUNT')"
        " for k in ('cpu', 'cuda')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True
    )
    from caikit_tuning.training.core_share import sees_the_whole_machine

    if not sees_the_whole_machine():
        expected = {**expected, "cpu": "1000"}
    assert json.loads(out.stdout) == expected, out.stderr
