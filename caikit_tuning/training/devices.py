"""Device, dtype and seed choices, made once per job."""

from __future__ import annotations

import os
import random

import alog
import numpy as np
import torch

log = alog.use_channel("DEVICE")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | None) -> torch.device:
    """`None` or "auto": the first CUDA device when there is one, else the CPU.

    Worker processes are given one GPU each through CUDA_VISIBLE_DEVICES, so "cuda"
    always means the job's own GPU.
    """
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One GPU per process under torchrun / Ray Train: this process's own.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"`device` {device!r} is not a torch device (try 'cpu' or 'cuda')."
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but no CUDA device is available; use 'cpu'.")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be 'cpu', 'cuda' or 'mps', got {device!r}.")
    return resolved


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Native bf16 matmuls (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slow.
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return False


def resolve_dtype(torch_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weight dtype: as asked, else float32 on CPU and bf16 (or fp16) on GPUs."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype is None or torch_dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if bf16_supported(device) else torch.float16
        return torch.float32
    try:
        dtype = _DTYPES[str(torch_dtype).lower().removeprefix("torch.")]
    except KeyError as err:
        raise ValueError(
            f"`torch_dtype` must be one of {sorted(set(_DTYPES))} or null, got {torch_dtype!r}."
        ) from err
    if dtype == torch.float16 and device.type == "cpu":
        # As caikit-nlp does for dtypes the device lacks: float16 matmuls on CPU are slow
        # and overflow in training (caikit-nlp's own fp16 CPU runs end in NaN).
        log.warning("`torch_dtype` float16 is not supported on CPU: using float32")
        return torch.float32
    if dtype == torch.bfloat16 and device.type == "cuda" and not bf16_supported(device):
        raise ValueError("`torch_dtype` bfloat16 is not supported by this GPU; use float16.")
    return dtype


def autocast_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype | None:
    """Mixed precision for float32 weights where the hardware runs bf16 natively."""
    if weight_dtype != torch.float32:
        return None
    return torch.bfloat16 if bf16_supported(device) else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
