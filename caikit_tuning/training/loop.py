"""The method-agnostic training loop: forward, loss, backward, accumulate, step, log."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import alog
import torch
from tqdm.auto import tqdm

from ..data.batching import Batch, length_grouped_batches
from ..data.tokenize import Example
from .progress import report
from .settings import TrainingSettings

log = alog.use_channel("TRAIN")


@dataclass
class TrainingResult:
    """What a run did, step by step and in total."""

    logs: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    seconds_to_first_step: float | None = None
    real_tokens: int = 0
    padded_tokens: int = 0
    target_tokens: int = 0

    @property
    def final_loss(self) -> float | None:
        losses = [entry["loss"] for entry in self.logs if "loss" in entry]
        return losses[-1] if losses else None


def _optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters at once; it exists for CPU and CUDA floats.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def train(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[Batch], torch.Tensor],
    examples: list[Example],
    collate: Callable[[list[Example]], Batch],
    settings: TrainingSettings,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    val_examples: list[Example] | None = None,
) -> TrainingResult:
    """Optimize `params` to lower `loss_fn` (a summed token loss) over `examples`.

    Each optimizer step averages the loss over every target token of its
    `accumulate_steps` micro-batches. With `val_examples`, the validation loss is
    logged after every epoch.
    """
    params = list(params)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient.")
    generator = torch.Generator().manual_seed(settings.seed)
    lengths = [len(ex) for ex in examples]
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.accumulate_steps)
    total_steps = steps_per_epoch * settings.num_epochs
    optimizer = _optimizer(params, settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
    )
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    result = TrainingResult()
    pending: list[tuple[dict, torch.Tensor]] = []
    progress = tqdm(total=total_steps, desc="training", disable=settings.silence_progress_bars)
    started = time.perf_counter()
    model.train()
    for epoch in range(settings.num_epochs):
        order = length_grouped_batches(
            lengths, settings.batch_size, generator, settings.group_by_length
        )
        for window_start in range(0, len(order), settings.accumulate_steps):
            window = [
                collate([examples[i] for i in idx])
                for idx in order[window_start : window_start + settings.accumulate_steps]
            ]
            window_tokens = sum(batch.num_target_tokens for batch in window)
            step_loss = torch.zeros((), device=device)
            for batch in window:
                with autocast:
                    loss = loss_fn(batch.to(device)) / window_tokens
                loss.backward()
                step_loss += loss.detach()
                result.real_tokens += batch.num_real_tokens
                result.padded_tokens += batch.num_padded_tokens
                result.target_tokens += batch.num_target_tokens
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            if result.seconds_to_first_step is None:
                result.seconds_to_first_step = time.perf_counter() - started
            pending.append(
                (
                    {
                        "step": result.steps,
                        "epoch": round(epoch + (window_start + len(window)) / len(order), 4),
                        "learning_rate": schedule.get_last_lr()[0],
                        "tokens": result.real_tokens,
                        "elapsed_seconds": round(time.perf_counter() - started, 3),
                    },
                    step_loss,
                )
            )
            if len(pending) >= settings.logging_steps or result.steps == total_steps:
                _flush(pending, result, progress)
                _report_progress(result, total_steps, started)
        if val_examples:
            _flush(pending, result, progress)
            val_loss = evaluate_loss(
                model, loss_fn, val_examples, collate, settings.batch_size, device, autocast
            )
            result.logs.append(
                {"step": result.steps, "epoch": epoch + 1, "validation_loss": round(val_loss, 6)}
            )
            model.train()
    _flush(pending, result, progress)
    progress.close()
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def _report_progress(result: TrainingResult, total_steps: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    remaining = elapsed / result.steps * (total_steps - result.steps)
    report(
        {
            "step": result.steps,
            "total_steps": total_steps,
            "loss": result.final_loss,
            "elapsed_seconds": round(elapsed, 1),
            "eta_seconds": round(remaining, 1),
        }
    )


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    loss_fn: Callable[[Batch], torch.Tensor],
    examples: list[Example],
    collate: Callable[[list[Example]], Batch],
    batch_size: int,
    device: torch.device,
    autocast=None,
) -> float:
    """Mean loss per target token over `examples`, in eval mode."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total = torch.zeros((), device=device)
    tokens = 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]])
        with autocast or contextlib.nullcontext():
            total += loss_fn(batch.to(device)).float()
        tokens += batch.num_target_tokens
    return total.item() / max(tokens, 1)


def _flush(pending: list[tuple[dict, torch.Tensor]], result: TrainingResult, progress) -> None:
    """Read the losses of the pending steps back from the device, in one transfer."""
    if not pending:
        return
    losses = torch.stack([loss for _, loss in pending]).tolist()
    for (entry, _), loss in zip(pending, losses, strict=True):
        entry["loss"] = round(loss, 6)
        result.logs.append(entry)
    log.debug("step %d loss %.4f", result.logs[-1]["step"], result.logs[-1]["loss"])
    progress.update(len(pending))
    progress.set_postfix(loss=f"{result.logs[-1]['loss']:.4f}")
    pending.clear()
