"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .settings import TrainingSettings


def build_optimizer(
    params: list[torch.nn.Parameter], settings: TrainingSettings
) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass; it exists for CPU and CUDA floats.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params,
        lr=settings.peak_learning_rate,
        weight_decay=settings.optimization.weight_decay,
        fused=fused,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_schedule(
    optimizer: torch.optim.Optimizer, settings: TrainingSettings, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    options = settings.optimization
    warmup = options.warmup_steps or int(options.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, options.lr_scheduler)
    )
