"""The steps every tuning module's train() shares: check the request, load, tokenize, fit.

A module's train() reads as: plan (validate everything cheap) -> records -> load the
base model -> set up what is trained -> `fit` -> build the module. `validate` runs
the same checks without training, for the runtime to call at submission.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import alog
import torch
from caikit.core.data_model import ProducerId

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
from ..data import (
    Batch,
    Verbalizer,
    build_examples,
    check_fields,
    collator_for,
    collect_records,
    is_chat,
)
from ..data.files import mix_records
from ..generation import GenerationSettings, TextGenerator
from ..inputs import PromptPrefix
from ..storage import write_jsonl
from ..training import (
    TrainingResult,
    TrainingSettings,
    autocast_dtype,
    resolve_device,
    resolve_dtype,
    summed_token_loss,
    train,
)
from ..training.distributed import world
from ..training.plots import write_loss_curve
from ..training.precision import FrozenWeightCast
from ..training.segment_attention import segment_attention
from ..training.tracking import Tracker, record_model_path
from .presets import apply_preset

log = alog.use_channel("RECIPE")

TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingSettings)) + (
    "validation",
    "optimization",
    "data",
)


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


def placement(device: Any, torch_dtype: Any) -> tuple[torch.device, torch.dtype]:
    """Device and weight dtype for a request, the dtype defaulting to the config's."""
    device_ = resolve_device(device)
    return device_, resolve_dtype(torch_dtype or library_settings().torch_dtype, device_)


ROPE_TYPES = ("linear", "dynamic")


def rope_scaling_from(value: Any) -> dict | None:
    """A request's rope_scaling (RopeScalingConfig or dict) checked, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        value = {"type": getattr(value, "type", None), "factor": getattr(value, "factor", None)}
    if not value.get("type") and not value.get("factor"):
        return None  # an empty wire message
    kind = str(value.get("type") or "").lower()
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"`rope_scaling.type` must be one of {list(ROPE_TYPES)}, got {value.get('type')!r}."
        )
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ValueError(f"`rope_scaling.factor` must be a number > 1, got {factor!r}.")
    return {"type": kind, "factor": float(factor)}


def plan_training(
    base_model: Any,
    device: Any,
    verbalizer: Any,
    torch_dtype: Any,
    rope_scaling: Any = None,
    **training_values: Any,
) -> TrainingPlan:
    template = Verbalizer.parse(verbalizer if verbalizer is not None else "{{input}}")
    # Under torch.distributed, the global batch is shared by every process.
    training = TrainingSettings.from_request(num_processes=world().size, **training_values)
    located = locate_base_model(base_model)
    config = load_model_config(located)
    encoder_decoder = is_encoder_decoder(config)
    rope = rope_scaling_from(rope_scaling)
    rope_scaled(config, rope)  # refuses models without rotary embeddings, now
    device_, dtype = placement(device, torch_dtype)
    amp = None if torch_dtype else autocast_dtype(device_, dtype)
    notes = []
    asked_fp16 = str(torch_dtype).lower().removeprefix("torch.") in ("float16", "fp16")
    if asked_fp16 and dtype != torch.float16:
        notes.append("torch_dtype float16 is not supported on CPU: trained in float32")
    if training.num_epochs == 0:
        notes.append("num_epochs 0: no training, the initial weights are kept (as caikit-nlp)")
    return TrainingPlan(
        training, template, located, encoder_decoder, device_, dtype, amp, rope, tuple(notes)
    )


def trained_on_chat(records: list[dict]) -> bool:
    return bool(records) and is_chat(records[0])


def bind_arguments(train_method: Callable, arguments: dict[str, Any]) -> dict[str, Any]:
    """A train() call's arguments with defaults applied; missing ones are None so the
    checks name them, unknown ones are an error."""
    signature = inspect.signature(train_method)
    unknown = sorted(set(arguments) - set(signature.parameters))
    if unknown:
        raise ValueError(
            f"unknown train parameter(s) {unknown}; valid: {list(signature.parameters)}."
        )
    bound = signature.bind_partial(**arguments)
    bound.apply_defaults()
    return {name: bound.arguments.get(name) for name in signature.parameters}


def training_values(arguments: dict[str, Any], method: str) -> dict[str, Any]:
    """The TrainingSettings fields among a train() call's arguments, with the knobs it
    leaves unset taken from its `preset` (or the method's defaults)."""
    values = {k: v for k, v in arguments.items() if k in TRAINING_FIELDS}
    return apply_preset(method, arguments.get("preset"), values)


def training_data_limit(module_ids: tuple[str, ...], plan: TrainingPlan) -> int:
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
    name = plan.located.source.name or Path(plan.located.location).name
    for module_id in module_ids:
        if isinstance(limits.get(module_id), dict):
            per_model = dict(limits[module_id])
            limit = per_model.get(name, per_model.get("__default__", limit))
            break
    return int(limit or 0)


def read_records(
    train_stream: Any, val_stream: Any, plan: TrainingPlan, module_ids: tuple[str, ...] = ()
) -> tuple[list[dict], list[dict]]:
    """Training and validation records, checked against the plan; without a val_stream,
    validation.split_ratio of the training records (chosen with split_seed) become the
    validation set. `module_ids` name the module for `training_data_limit`."""
    training = plan.training
    cap = library_settings().max_training_records
    if training.mixture:
        if train_stream is not None:
            raise ValueError("give `train_stream` or `data.mixture`, not both.")
        try:
            train_stream = mix_records(
                training.mixture,
                training.mixture_mode,
                training.mixture_size,
                training.mixture_seed,
            )
        except ValueError as err:
            raise ValueError(f"`data.mixture`: {err}") from err
    records = collect_records(train_stream, "train_stream", cap)
    limit = training_data_limit(module_ids, plan)
    if limit > 0 and len(records) > limit:
        raise ValueError(
            f"`train_stream` has {len(records)} records; training_data_limit allows at most "
            f"{limit} for this module on base model {plan.located.source}. Use fewer records "
            "or raise the limit in the config."
        )
    val_records = collect_records(val_stream, "val_stream", required=False)
    for name, rows in (("train_stream", records), ("val_stream", val_records)):
        if rows and is_chat(rows[0]):
            if plan.is_encoder_decoder:
                raise ValueError(f"`{name}` holds chat records, which need a causal LM.")
            if plan.verbalizer.template != "{{input}}":
                raise ValueError(
                    f"`{name}` holds chat records, rendered by the chat template: leave "
                    "`verbalizer` unset."
                )
        check_fields(rows, plan.verbalizer.fields, name)
    ratio = training.validation.split_ratio
    if ratio and not val_records:
        count = int(len(records) * ratio)
        if count < 1 or count >= len(records):
            raise ValueError(
                f"`validation.split_ratio` {ratio} of {len(records)} records leaves no "
                "validation or no training records; use more records or another ratio."
            )
        order = torch.randperm(
            len(records), generator=torch.Generator().manual_seed(training.validation.split_seed)
        )
        held_out = set(order[:count].tolist())
        val_records = [r for i, r in enumerate(records) if i in held_out]
        records = [r for i, r in enumerate(records) if i not in held_out]
    return records, val_records


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
) -> TrainingResult:
    """Tokenize the records once and train `params` through the shared loop.

    `prefix(batch)` gives the soft prompts for a batch (None: for generation).
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

    forward = base.model
    if training.optimization.torch_compile:
        # Compiled for this run only: generation afterwards stays eager, where a growing
        # KV cache would otherwise recompile at every length.
        forward = torch.compile(base.model, dynamic=True)

    def loss_fn(batch: Batch) -> torch.Tensor:
        noise = training.neftune_noise_alpha if base.model.training else None
        loss = summed_token_loss(forward, batch, prefix(batch), noise)
        if penalty is not None and base.model.training:
            # The loop divides by the step's target tokens: weighting by this batch's
            # share adds `penalty` once per optimizer step, and never to validation loss.
            loss = loss + penalty() * batch.num_target_tokens
        return loss

    cast = FrozenWeightCast(model, plan.amp_dtype if cast_frozen_weights else None)
    accuracy = _accuracy(base, plan, prefix, val_records)

    def accuracy_fn() -> float:
        with cast.originals():  # greedy generation runs outside autocast, in float32
            return accuracy()

    # Packed rows: attention per example rather than a dense mask over the whole row
    # (not under torch.compile, which would recompile for every batch's lengths).
    per_example = segment_attention(model, enabled=not training.optimization.torch_compile)
    try:
        with deterministic(training.determinism), cast, per_example:
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


def _accuracy(
    base: BaseModel,
    plan: TrainingPlan,
    prefix: Callable[[Batch | None], PromptPrefix],
    records: list[dict],
) -> Callable[[], float] | None:
    """Greedy exact-match accuracy on up to validation.accuracy_examples records."""
    count = plan.training.validation.accuracy_examples
    if not count or not records:
        return None
    sample = records[:count]
    settings = GenerationSettings(max_new_tokens=plan.training.max_target_length)

    def accuracy() -> float:
        base.model.eval()
        generator = TextGenerator(
            base.model, base.tokenizer, ProducerId("validation", "0"), prefix(None)
        )
        hits = sum(
            generator.generate(plan.verbalizer.render(r), settings).generated_text.strip()
            == r["output"].strip()
            for r in sample
        )
        return hits / len(sample)

    return accuracy


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
