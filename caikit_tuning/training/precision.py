"""Frozen matmul weights cast once per run, for float32 models trained under autocast.

Autocast caches its casts only for weights that require a gradient. The frozen weights
of prompt tuning and LoRA are cast from float32 again on every forward: on the CPU
that was a fifth of a prompt-tuning step. Casting them once, with the same rounding,
gives bit-identical results without the per-step copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class FrozenWeightCast:
    """Within `with`, every frozen float32 `nn.Linear` weight of `model` is a `dtype` copy.

    Each weight is replaced in its module, not changed in place: a weight tied to the
    input embeddings (an LM head) stays float32 for the embedding lookup. The float32
    originals come back on exit (and inside `originals()`), so the model is unchanged
    afterwards. The copies cost half the float32 size of those weights while they live.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype
        self.saved: list[tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.Parameter]] = []

    def __enter__(self) -> FrozenWeightCast:
        if self.dtype is None:
            return self
        for module in self.model.modules():
            weight = module._parameters.get("weight") if type(module) is torch.nn.Linear else None
            if weight is None or weight.requires_grad or weight.dtype != torch.float32:
                continue
            copy = torch.nn.Parameter(weight.detach().to(self.dtype), requires_grad=False)
            self.saved.append((module, weight, copy))
        self._use(cast=True)
        return self

    def __exit__(self, *exc) -> None:
        self._use(cast=False)
        self.saved.clear()

    @contextlib.contextmanager
    def originals(self) -> Iterator[None]:
        """The float32 weights back for a while: for code that runs outside autocast."""
        self._use(cast=False)
        try:
            yield
        finally:
            self._use(cast=True)

    def _use(self, cast: bool) -> None:
        for module, original, copy in self.saved:
            module._parameters["weight"] = copy if cast else original
