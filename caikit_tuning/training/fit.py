"""How a tuning method's train() gets from a request to trained weights.

A module's train() reads as a recipe: `plan_training(request, method)` (every cheap
check, before weights or data), records (data.read_records with `plan.records()`),
the base model (`plan.load_base()`), what is trained, then `fit(...)`, and the
module built from the result (`training_summary`, `write_training_artifacts`).
Nothing here generates text: a module passes what generation it needs (validation
accuracy) in as a callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import alog
import torch

from ..base_models import (
    BaseModel,
    LocatedModel,
    is_encoder_decoder,
    load_base,
    load_model_config,
    locate_base_model,
    rope_scaled,
)
from ..config import library_settings
from ..data import Batch, RecordPlan, Verbalizer, build_examples, collator_for
from ..data_model.values import choice, number
from ..inputs import PromptPrefix
from ..storage import write_jsonl
from .api import TrainRequest
from .devices import autocast_dtype, resolve_device, resolve_dtype
from .distributed import world
from .fused_layers import fused_decoder_layers
from .linear_cross_entropy import fused_head
from .loop import TrainingResult, train
from .loss import summed_token_loss
from .plots import write_loss_curve
from .precision import FrozenWeightCast
from .presets import apply_preset
from .segment_attention import segment_attention
from .settings import TrainingSettings
from .tracking import Tracker, record_model_path

log = alog.use_channel("FIT")


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """Everything a train() call decides before touching weights or data."""

    training: TrainingSettings
    verbalizer: Verbalizer
    located: LocatedModel
    is_encoder_decoder: bool
    device: torch.device
    dtype: torch.dtype
    # bf16 autocast for float32 weights, unless the caller asked for float32 explicitly.
    amp_dtype: torch.dtype | None = None
    # {"type": linear|dynamic, "factor": f} applied to the base model's rotary embeddings.
    rope_scaling: dict | None = None
    # What the request asked for that was read another way, as caikit-nlp reads it
    # (logged, and recorded in the saved model's training metadata).
    notes: tuple[str, ...] = ()

    def load_base(self, quantization_config: Any | None = None) -> BaseModel:
        """Load the base model for training (a private copy: training changes it)."""
        return load_base(
            self.located, self.dtype, self.device, quantization_config, self.rope_scaling
        )

    def records(self, module_ids: tuple[str, ...]) -> RecordPlan:
        """How this job reads its records; `module_ids` name the module for
        training_data_limit."""
        training = self.training
        base = self.located.source.name or Path(self.located.location).name
        return RecordPlan(
            verbalizer=self.verbalizer,
            is_encoder_decoder=self.is_encoder_decoder,
            mixture=training.mixture,
            mixture_mode=training.mixture_mode,
            mixture_size=training.mixture_size,
            mixture_seed=training.mixture_seed,
            split_ratio=training.validation.split_ratio,
            split_seed=training.validation.split_seed,
            max_records=library_settings().max_training_records,
            limit=training_data_limit(module_ids, base),
            limit_scope=f"this module on base model {self.located.source}",
        )


def placement(device: Any, torch_dtype: Any) -> tuple[torch.device, torch.dtype]:
    """Device and weight dtype for a request, the dtype defaulting to the config's."""
    device_ = resolve_device(device)
    return device_, resolve_dtype(torch_dtype or library_settings().torch_dtype, device_)


def plan_training(request: TrainRequest, method: str) -> TrainingPlan:
    """Check a request's shared parameters and decide how it trains (`method` names
    the defaults and presets of training/presets.py)."""
    verbalizer = request.verbalizer
    template = Verbalizer.parse(verbalizer if verbalizer is not None else "{{input}}")
    values = apply_preset(method, request.preset, request.training_values())
    # Under torch.distributed, the global batch is shared by every process.
    training = TrainingSettings.from_request(
        validation=request.validation,
        optimization=request.optimization,
        data=request.data,
        num_processes=world().size,
        **values,
    )
    located = locate_base_model(request.base_model)
    config = load_model_config(located)
    encoder_decoder = is_encoder_decoder(config)
    rope = rope_scaling_from(request.rope_scaling)
    rope_scaled(config, rope)  # refuses models without rotary embeddings, now
    device_, dtype = placement(request.device, request.torch_dtype)
    amp = None if request.torch_dtype else autocast_dtype(device_, dtype)
    notes = []
    asked_fp16 = str(request.torch_dtype).lower().removeprefix("torch.") in ("float16", "fp16")
    if asked_fp16 and dtype != torch.float16:
        notes.append("torch_dtype float16 is not supported on CPU: trained in float32")
    if training.num_epochs == 0:
        notes.append("num_epochs 0: no training, the initial weights are kept (as caikit-nlp)")
    return TrainingPlan(
        training, template, located, encoder_decoder, device_, dtype, amp, rope, tuple(notes)
    )


def training_data_limit(module_ids: tuple[str, ...], base_name: str) -> int:
    """caikit-nlp's `training_data_limit` config: the most training records a module
    (by id) may use on a base model (by folder name); 0 or less is no limit.

        training_data_limit:
          __default__: -1               # every module, every base model
          <module id>:
            __default__: 10000          # this module, any base model
            SmolLM2-135M-Instruct: 500  # this module on this base model
    """
    limits = library_settings().training_data_limit
    limit = limits.get("__default__", -1)
    for module_id in module_ids:
        if isinstance(limits.get(module_id), dict):
            per_model = dict(limits[module_id])
            limit = per_model.get(base_name, per_model.get("__default__", limit))
            break
    return int(limit or 0)


ROPE_TYPES = ("linear", "dynamic")


def rope_scaling_from(value: Any) -> dict | None:
    """A request's rope_scaling (RopeScalingConfig or dict) checked, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        value = {"type": getattr(value, "type", None), "factor": getattr(value, "factor", None)}
    if not value.get("type") and not value.get("factor"):
        return None  # an empty wire message
    kind = choice(str(value.get("type") or ""), "rope_scaling.type", ROPE_TYPES)
    try:
        factor = number(value.get("factor"), "rope_scaling.factor", 1.0, low_open=True)
    except ValueError:
        raise ValueError(
            f"`rope_scaling.factor` must be a number > 1, got {value.get('factor')!r}."
        ) from None
    return {"type": kind, "factor": factor}


def fit(
    base: BaseModel,
    plan: TrainingPlan,
    params: list[torch.nn.Parameter],
    prefix: Callable[[Batch | None], PromptPrefix],
    records: list[dict],
    val_records: list[dict],
    after_step: Callable[[int], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    cast_frozen_weights: bool = True,
    accuracy: Callable[[], float] | None = None,
) -> TrainingResult:
    """Tokenize the records once and train `params` through the shared loop.

    `prefix(batch)` gives the soft prompts for a batch (None: for generation).
    `accuracy()`, when given, scores the model on validation records (by generating).
    `after_step(step)` runs after every optimizer step, before gradients are cleared;
    `penalty()` is a regularization term added to every step's mean token loss.
    Under autocast, frozen float32 matmul weights are cast once for the run
    (training.precision) unless `cast_frozen_weights` is False: for layers that read
    their base weight outside its matmul (DoRA's weight norm)."""
    training = plan.training
    examples, val_examples = (
        build_examples(
            base.tokenizer,
            rows,
            plan.verbalizer.render,
            training.max_source_length,
            training.max_target_length,
            training.chat_loss,
        )
        for rows in (records, val_records)
    )
    model = base.model
    # transformers 5 renamed gradient checkpointing to activation checkpointing.
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    disable = (
        getattr(model, "activation_checkpointing_disable", None)
        or model.gradient_checkpointing_disable
    )
    if training.gradient_checkpointing:
        enable({"use_reentrant": False})
    tracker = Tracker(
        {**training.to_config(), "base_model": str(plan.located.source)}, enabled=world().is_main
    )

    def loss_fn(batch: Batch) -> torch.Tensor:
        noise = training.neftune_noise_alpha if base.model.training else None
        loss = summed_token_loss(base.model, batch, prefix(batch), noise)
        if penalty is not None and base.model.training:
            # The loop divides by the step's target tokens: weighting by this batch's
            # share adds `penalty` once per optimizer step, and never to validation loss.
            loss = loss + penalty() * batch.num_target_tokens
        return loss

    cast = FrozenWeightCast(model, plan.amp_dtype if cast_frozen_weights else None)

    def accuracy_fn() -> float:
        with cast.originals():  # greedy generation runs outside autocast, in float32
            return accuracy()

    # Packed rows: attention per example rather than a dense mask over the whole row
    # (not under torch.compile, which would recompile for every batch's lengths).
    per_example = segment_attention(model, enabled=not training.optimization.torch_compile)
    try:
        with (
            deterministic(training.determinism),
            cast,
            fused_decoder_layers(model, cast.dtype),
            per_example,
            compiled_for_the_run(model, training.optimization.torch_compile),
        ):
            result = train(
                model=base.model,
                params=params,
                loss_fn=loss_fn,
                examples=examples,
                collate=collator_for(
                    base.is_encoder_decoder,
                    base.tokenizer.pad_token_id,
                    getattr(base.model.config, "decoder_start_token_id", None),
                    training.packing,
                ),
                settings=training,
                device=plan.device,
                amp_dtype=plan.amp_dtype,
                val_examples=val_examples,
                accuracy_fn=accuracy_fn if accuracy else None,
                on_log=tracker.log,
                after_step=after_step,
            )
    except BaseException:
        tracker.finish("FAILED")
        raise
    else:
        tracker.finish()
        result.tracking_run_id = tracker.run_id
        return result
    finally:
        if training.gradient_checkpointing:
            disable()


def training_summary(
    plan: TrainingPlan, result: TrainingResult, num_records: int, notes: tuple[str, ...] = ()
) -> dict:
    """What a saved model records about how it was trained; `notes` (with the plan's)
    say what in the request was read another way."""
    for note in (*plan.notes, *notes):
        log.warning("training request: %s", note)
    return {
        **plan.training.to_config(),
        "torch_dtype": str(plan.dtype).removeprefix("torch."),
        "autocast": str(plan.amp_dtype).removeprefix("torch.") if plan.amp_dtype else None,
        "num_records": num_records,
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "seconds_to_first_step": result.seconds_to_first_step,
        "final_loss": result.final_loss,
        "real_tokens": result.real_tokens,
        "padded_tokens": result.padded_tokens,
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "resumed_from_step": result.resumed_from_step,
        "tracking_run_id": result.tracking_run_id,
        "rope_scaling": plan.rope_scaling,
        "notes": [*plan.notes, *notes],
    }


@contextlib.contextmanager
def compiled_for_the_run(model: torch.nn.Module, enabled: bool):
    """torch.compile for the run only; generation afterwards stays eager, where a growing
    KV cache would recompile at every length.

    Where the LM head is fused with the loss, only the decoder is compiled: the head,
    the loss and the gather of the target positions stay eager, so a batch of a new
    length reuses the graph (dynamic shapes) instead of recompiling. Compiled in place
    (`Module.compile`): parameter names, checkpoints and the saved model are unchanged."""
    if not enabled:
        yield
        return
    fused = fused_head(model)
    target = fused[0] if fused is not None else model
    target.compile(dynamic=True)
    try:
        yield
    finally:
        target._compiled_call_impl = None  # what Module.compile set; it has no undo


@contextlib.contextmanager
def deterministic(level: str):
    """no: fastest kernels; half: cuDNN deterministic, no autotuning; full: only
    deterministic implementations (torch raises on an op that has none)."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    if level in ("half", "full"):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if level == "full":
        # cuBLAS needs a fixed workspace to be deterministic (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2])


TRAINING_LOGS = "training_logs.jsonl"
TRAINING_CURVE = "training_curve.png"


def write_training_artifacts(folder: Path, logs: list[dict], title: str) -> None:
    """training_logs.jsonl and, when there are losses, training_curve.png."""
    write_jsonl(folder / TRAINING_LOGS, logs)
    write_loss_curve(logs, folder / TRAINING_CURVE, title)


def after_save(training_config: dict, model_path: str) -> None:
    """Tell the tracker where the model went."""
    record_model_path(training_config.get("tracking_run_id"), model_path)
