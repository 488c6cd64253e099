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
    ("preset", "expected"),
    [
        ({}, ("1000", None)),  # a short OpenMP spin by default
        ({"OMP_WAIT_POLICY": "PASSIVE"}, (None, "PASSIVE")),  # an explicit policy wins
        ({"GOMP_SPINCOUNT": "5"}, ("5", None)),
    ],
)
def test_import_sets_a_short_openmp_spin_unless_told_otherwise(preset, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import os, caikit_tuning; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True
    )
    assert out.stdout.split() == [str(value) for value in expected]
