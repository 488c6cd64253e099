"""The method-agnostic training loop: forward, loss, backward, accumulate, step, log,
validate, stop early, checkpoint and resume."""

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
from . import checkpoints, distributed
from .core_share import shared_cores
from .progress import report
from .schedule import build_optimizer, build_schedule
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
    stopped_early: bool = False
    best_step: int | None = None
    resumed_from_step: int | None = None
    tracking_run_id: str | None = None

    @property
    def final_loss(self) -> float | None:
        losses = [entry["loss"] for entry in self.logs if "loss" in entry]
        return losses[-1] if losses else None


@dataclass
class _Best:
    """The best validation so far and the weights that reached it."""

    loss: float = math.inf
    step: int | None = None
    weights: list[torch.Tensor] | None = None
    evals_without_improvement: int = 0


def total_steps(settings: TrainingSettings, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: each takes `accumulation` micro-batches on every process."""
    batches = math.ceil(num_examples / settings.micro_batch_size)
    return math.ceil(batches / (settings.accumulation * world_size)) * settings.num_epochs


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
    accuracy_fn: Callable[[], float] | None = None,
    on_log: Callable[[dict], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainingResult:
    """Optimize `params` to lower `loss_fn` (a summed token loss) over `examples`.

    Each optimizer step averages the loss over every target token of its micro-batches.
    With `val_examples`, validation (loss, perplexity and `accuracy_fn()`) runs every
    `validation.eval_steps` steps or after every epoch, and may stop training early,
    keeping the best weights. With `checkpoint_steps` and a checkpoint folder (see
    training.checkpoints), the run saves resumable state and resumes from it.
    `after_step(step)` runs after each optimizer step, before the gradients are cleared.
    """
    params = list(params)
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient.")
    if settings.num_epochs == 0:
        return TrainingResult()
    run = _Run(model, params, loss_fn, examples, collate, settings, device, amp_dtype)
    run.val_examples = val_examples or []
    run.accuracy_fn = accuracy_fn
    run.on_log = on_log
    run.after_step = after_step
    return run.execute()


class _Run:
    def __init__(self, model, params, loss_fn, examples, collate, settings, device, amp_dtype):
        self.model, self.params, self.loss_fn = model, params, loss_fn
        self.examples, self.collate, self.settings, self.device = (
            examples,
            collate,
            settings,
            device,
        )
        self.autocast = (
            torch.autocast(device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        self.lengths = [len(ex) for ex in examples]
        # Target tokens per example: a step's loss is divided by the tokens of the whole
        # global window, which every process can count without collating other shares.
        self.target_counts = [len(ex.target_ids) + len(ex.source_targets) for ex in examples]
        self.world = distributed.world()
        self.total_steps = total_steps(settings, len(examples), self.world.size)
        self.optimizer = build_optimizer(params, settings)
        self.schedule = build_schedule(self.optimizer, settings, self.total_steps)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.result = TrainingResult()
        self.best = _Best()
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.folder = checkpoints.checkpoint_folder() if settings.checkpoint_steps else None
        self.fingerprint = checkpoints.fingerprint(settings.to_config(), examples)
        self.val_examples: list[Example] = []
        self.accuracy_fn = None
        self.on_log = None
        self.after_step = None
        self.cores = shared_cores() if device.type == "cpu" else None

    # ----------------------------------------------------------------- loop

    def execute(self) -> TrainingResult:
        settings = self.settings
        start_epoch, start_window, epoch_rng = self._resume()
        progress = tqdm(
            total=self.total_steps,
            initial=self.result.steps,
            desc="training",
            disable=settings.silence_progress_bars or not self.world.is_main,
        )
        self.progress = progress
        self.started = time.perf_counter() - self.result.seconds
        self.model.train()
        stop = False
        for epoch in range(start_epoch, settings.num_epochs):
            if epoch != start_epoch or epoch_rng is None:
                epoch_rng = self.generator.get_state()
            self.generator.set_state(epoch_rng)
            order = length_grouped_batches(
                self.lengths, settings.micro_batch_size, self.generator, settings.group_by_length
            )
            width = settings.accumulation * self.world.size
            windows = [order[i : i + width] for i in range(0, len(order), width)]
            for index in range(start_window if epoch == start_epoch else 0, len(windows)):
                self._step(windows[index], epoch + (index + 1) / len(windows))
                position = (epoch, index + 1, epoch_rng)
                eval_steps = settings.validation.eval_steps
                if self.val_examples and eval_steps and self.result.steps % eval_steps == 0:
                    stop = self._validate(epoch + (index + 1) / len(windows))
                if (
                    self.folder
                    and self.world.is_main
                    and self.result.steps % settings.checkpoint_steps == 0
                ):
                    self._save(*position)
                if stop:
                    break
            if not stop and self.val_examples and not settings.validation.eval_steps:
                stop = self._validate(epoch + 1)
            if stop:
                self.result.stopped_early = True
                break
        self._flush()
        progress.close()
        self.model.eval()
        if settings.validation.early_stopping_patience and self.best.weights is not None:
            # Early stopping keeps the weights of the best validation, not the last.
            with torch.no_grad():
                for param, weight in zip(self.params, self.best.weights, strict=True):
                    param.copy_(weight)
            self.result.best_step = self.best.step
        self.result.seconds = time.perf_counter() - self.started
        return self.result

    def _step(self, window: list[list[int]], epoch_position: float) -> None:
        window_tokens = sum(self.target_counts[i] for idx in window for i in idx)
        # This process's share of the global window's micro-batches.
        mine = window[self.world.rank :: self.world.size]
        step_loss = torch.zeros((), device=self.device)
        tokens = [0, 0, 0]  # real, padded, target
        for idx in mine:
            if self.cores is not None:
                self.cores.adjust()
            batch = self.collate([self.examples[i] for i in idx])
            with self.autocast:
                loss = self.loss_fn(batch.to(self.device)) / window_tokens
            loss.backward()
            step_loss += loss.detach().float()
            tokens[0] += batch.num_real_tokens
            tokens[1] += batch.num_padded_tokens
            tokens[2] += batch.num_target_tokens
        if self.world.size > 1:
            distributed.all_reduce_gradients(self.params)
            shared = distributed.all_reduce_sum(
                torch.tensor(tokens, dtype=torch.float64, device=self.device)
            )
            tokens = [int(v) for v in shared[:3].tolist()]
            distributed.all_reduce_sum(step_loss)
        self.result.real_tokens += tokens[0]
        self.result.padded_tokens += tokens[1]
        self.result.target_tokens += tokens[2]
        if self.settings.optimization.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.optimization.max_grad_norm)
        self.optimizer.step()
        if self.after_step is not None:
            # Before zero_grad: AdaLoRA's rank allocation reads this step's gradients.
            self.after_step(self.result.steps + 1)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.result.steps += 1
        if self.result.seconds_to_first_step is None:
            self.result.seconds_to_first_step = time.perf_counter() - self.started
        entry = {
            "step": self.result.steps,
            "epoch": round(epoch_position, 4),
            "learning_rate": self.schedule.get_last_lr()[0],
            "tokens": self.result.real_tokens,
            "elapsed_seconds": round(time.perf_counter() - self.started, 3),
        }
        self.pending.append((entry, step_loss))
        if (
            len(self.pending) >= self.settings.logging_steps
            or self.result.steps == self.total_steps
        ):
            self._flush()
        self._report_progress()

    def _report_progress(self) -> None:
        """Every step: where the run is, with the latest loss read back so far."""
        if not self.world.is_main:
            return
        elapsed = time.perf_counter() - self.started
        done = self.result.steps
        report(
            {
                "step": done,
                "total_steps": self.total_steps,
                "loss": self.result.final_loss,
                "elapsed_seconds": round(elapsed, 1),
                "eta_seconds": round(elapsed / max(done, 1) * (self.total_steps - done), 1),
            }
        )

    def _flush(self) -> None:
        """Read the losses of the pending steps back from the device, in one transfer."""
        if not self.pending:
            return
        losses = torch.stack([loss for _, loss in self.pending]).tolist()
        for (entry, _), loss in zip(self.pending, losses, strict=True):
            entry["loss"] = round(loss, 6)
            self._log(entry)
        self.progress.update(len(self.pending))
        self.progress.set_postfix(loss=f"{losses[-1]:.4f}")
        self.pending.clear()

    def _log(self, entry: dict) -> None:
        self.result.logs.append(entry)
        if self.on_log is not None:
            self.on_log(entry)

    # ----------------------------------------------------------- validation

    def _validate(self, epoch_position: float) -> bool:
        """Log validation metrics; True when early stopping says to stop."""
        self._flush()
        loss = evaluate_loss(
            self.model,
            self.loss_fn,
            self.val_examples,
            self.collate,
            self.settings.micro_batch_size,
            self.device,
            self.autocast,
        )
        entry = {
            "step": self.result.steps,
            "epoch": round(epoch_position, 4),
            "validation_loss": round(loss, 6),
            "validation_perplexity": round(math.exp(min(loss, 50.0)), 4),
        }
        if self.accuracy_fn is not None:
            entry["validation_accuracy"] = round(self.accuracy_fn(), 4)
        self._log(entry)
        report(
            {
                "step": self.result.steps,
                "total_steps": self.total_steps,
                "validation_loss": entry["validation_loss"],
            }
        )
        self.model.train()
        validation = self.settings.validation
        if loss < self.best.loss - validation.early_stopping_min_delta:
            self.best.loss, self.best.step = loss, self.result.steps
            self.best.evals_without_improvement = 0
            if validation.early_stopping_patience:
                self.best.weights = [p.detach().clone() for p in self.params]
            return False
        self.best.evals_without_improvement += 1
        patience = validation.early_stopping_patience
        return bool(patience) and self.best.evals_without_improvement >= patience

    # --------------------------------------------------------- checkpoints

    def _save(self, epoch: int, window: int, epoch_rng: torch.Tensor) -> None:
        self._flush()
        state = {
            "fingerprint": self.fingerprint,
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": epoch,
            "window": window,
            "epoch_rng": epoch_rng,
            "torch_rng": torch.get_rng_state(),
            "result": {
                "logs": self.result.logs,
                "steps": self.result.steps,
                "seconds": time.perf_counter() - self.started,
                "real_tokens": self.result.real_tokens,
                "padded_tokens": self.result.padded_tokens,
                "target_tokens": self.result.target_tokens,
            },
            "best": {
                "loss": self.best.loss,
                "step": self.best.step,
                "weights": self.best.weights,
                "evals_without_improvement": self.best.evals_without_improvement,
            },
        }
        checkpoints.save_checkpoint(self.folder, state)
        log.debug("checkpoint at step %d", self.result.steps)

    def _resume(self) -> tuple[int, int, torch.Tensor | None]:
        """Restore the last checkpoint of this very run, if there is one."""
        state = checkpoints.load_checkpoint(self.folder, self.fingerprint) if self.folder else None
        if state is None:
            return 0, 0, None
        with torch.no_grad():
            for param, saved in zip(self.params, state["params"], strict=True):
                param.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        saved = state["result"]
        self.result = TrainingResult(
            logs=list(saved["logs"]),
            steps=saved["steps"],
            seconds=saved["seconds"],
            real_tokens=saved["real_tokens"],
            padded_tokens=saved["padded_tokens"],
            target_tokens=saved["target_tokens"],
            resumed_from_step=saved["steps"],
        )
        best = state["best"]
        self.best = _Best(
            best["loss"], best["step"], best["weights"], best["evals_without_improvement"]
        )
        log.info("resuming from the checkpoint at step %d", saved["steps"])
        # The generator's state at the epoch start regenerates that epoch's batch order.
        self.generator.set_state(state["epoch_rng"])
        return state["epoch"], state["window"], state["epoch_rng"]


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
