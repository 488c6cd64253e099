"""One copy of each base model in memory, shared by every model built on it.

Loaded models hold the BaseModel strongly; the registry only weakly. When the last
prompt / adapter / TextGeneration model using a base is unloaded, Python frees the
base model with it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .loading import BaseModel, BaseModelSource, LocatedModel, load_base

_SHARED: weakref.WeakValueDictionary[tuple, BaseModel] = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def load_shared(
    located: LocatedModel,
    dtype: torch.dtype,
    device: torch.device,
    rope_scaling: dict | None = None,
) -> BaseModel:
    """The loaded base model for (location, dtype, device, RoPE scaling), loading it on
    first use."""
    key = (located.location, str(dtype), str(device), repr(sorted((rope_scaling or {}).items())))
    with _LOCK:
        base = _SHARED.get(key)
        if base is None:
            base = load_base(located, dtype, device, rope_scaling=rope_scaling)
            _SHARED[key] = base
        return base


def is_shared(base: BaseModel) -> bool:
    """Whether `base` is the registry's copy (so other models may be using it)."""
    with _LOCK:
        return any(shared is base for shared in _SHARED.values())


def served_model_info(kind: str, base: BaseModel, source: BaseModelSource | None = None) -> dict:
    """What GetModelsInfo and /info/models show of a served model: its kind, the base
    model it is built on, and whether it shares that base's loaded copy."""
    return {
        "kind": kind,
        "base_model": (source or base.source).public_name,
        "shares_base": is_shared(base),
    }


def shared_count() -> int:
    """How many base models are in memory through the registry."""
    return len(_SHARED)
