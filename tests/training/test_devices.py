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
