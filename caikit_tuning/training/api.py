"""The train() API every tuning module shares, declared once.

caikit builds a module's training request message from its `train()` signature, so
every module must show one explicit, annotated signature, in a fixed order (the order
gives the wire field numbers). The twenty-odd parameters the methods share are
declared here, with their documentation; a module declares only its own:

    @classmethod
    @train_api("prompt_tuning", after_device=("tuning_type",))
    def train(cls, request: TrainRequest, tuning_config: TuningConfig,
              tuning_type: Optional[str] = "PROMPT_TUNING") -> "PeftPromptTuning":
        '''Learn a soft prompt ...

        Args:
            tuning_config: ...
        Returns:
            ...
        '''

`train_api` gives the module a `train` whose signature and docstring are the shared
parameters with the module's own in their places (required ones after `train_stream`,
those named in `after_device` after `device`, the others after `checkpoint_steps`).
A call is bound to that signature (an unknown name is a TypeError, as for any Python
function); the shared values reach the module as one `TrainRequest`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Optional

from caikit.core.data_model import DataStream

from ..data_model import (
    DataConfig,
    OptimizationConfig,
    RopeScalingConfig,
    TrainGenerationRecord,
    ValidationConfig,
)
from .presets import DEFAULTS

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class TrainRequest:
    """The shared parameters of one train() call, as given (None: unset)."""

    base_model: Any
    train_stream: Any
    val_stream: Any = None
    device: Optional[str] = None
    num_epochs: Optional[int] = None
    learning_rate: Optional[float] = None
    verbalizer: Optional[str] = "{{input}}"
    batch_size: Optional[int] = None
    max_source_length: Optional[int] = 256
    max_target_length: Optional[int] = 128
    accumulate_steps: Optional[int] = None
    torch_dtype: Optional[str] = None
    silence_progress_bars: Optional[bool] = True
    seed: Optional[int] = 42
    gradient_checkpointing: Optional[bool] = False
    validation: Any = None
    optimization: Any = None
    data: Any = None
    checkpoint_steps: Optional[int] = None
    preset: Optional[str] = None
    neftune_noise_alpha: Optional[float] = None
    rope_scaling: Any = None
    determinism: Optional[str] = None

    # The request's knobs that TrainingSettings holds (the rest shape the plan).
    SETTINGS = (
        "num_epochs",
        "learning_rate",
        "batch_size",
        "max_source_length",
        "max_target_length",
        "accumulate_steps",
        "silence_progress_bars",
        "seed",
        "gradient_checkpointing",
        "checkpoint_steps",
        "preset",
        "neftune_noise_alpha",
        "determinism",
    )

    def training_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SETTINGS}


@dataclass(frozen=True)
class _Shared:
    name: str
    annotation: Any
    default: Any
    doc: str  # {epochs} and {lr} become the method's defaults


# In signature order; "*" entries are where a module's own parameters go.
_SHARED = (
    _Shared(
        "base_model",
        str,
        _REQUIRED,
        "a name under `base_models_dir` or, in-process, a model folder.",
    ),
    _Shared(
        "train_stream",
        DataStream[TrainGenerationRecord],
        _REQUIRED,
        "training records: `input` and `output` (TrainGenerationRecord, or dicts with the "
        "fields the verbalizer names), chat records (`messages`), or caikit's "
        "ClassificationTrainRecord (`text`, `labels`).",
    ),
    "*required",
    _Shared(
        "val_stream",
        Optional[DataStream[TrainGenerationRecord]],
        None,
        "validation records (loss, perplexity and, with validation.accuracy_examples, "
        "accuracy); default: none, or validation.split_ratio of the training records.",
    ),
    _Shared("device", Optional[str], None, '"cpu", "cuda", ...; default: a GPU when there is one.'),
    "*after_device",
    _Shared(
        "num_epochs",
        Optional[int],
        None,
        "passes over the training records (0: no training). Default {epochs} (or the preset's).",
    ),
    _Shared(
        "learning_rate",
        Optional[float],
        None,
        "peak AdamW learning rate, scheduled by optimization.lr_scheduler (default: linear "
        "decay to 0). Default {lr} (or the preset's).",
    ),
    _Shared(
        "verbalizer",
        Optional[str],
        "{{input}}",
        "template that turns a record into the model's input, e.g. \"Review: {{input}} "
        'Sentiment:"; applied at inference too. Default "{{input}}".',
    ),
    _Shared(
        "batch_size", Optional[int], None, "records per micro-batch. Default 8 (or the preset's)."
    ),
    _Shared(
        "max_source_length",
        Optional[int],
        256,
        "longest input in tokens; longer ones lose their start. Default 256.",
    ),
    _Shared(
        "max_target_length",
        Optional[int],
        128,
        "longest output in tokens, EOS included. Default 128.",
    ),
    _Shared(
        "accumulate_steps",
        Optional[int],
        None,
        "micro-batches per optimizer step. Default 1 (or the preset's).",
    ),
    _Shared(
        "torch_dtype",
        Optional[str],
        None,
        "weight dtype (float32, bfloat16, float16). Unset: the config's torch_dtype, else on "
        "GPUs bfloat16 (float16 where bf16 is unsupported) and on CPUs float32 weights, "
        "computed under bf16 autocast where the CPU runs bf16 natively (AVX512-BF16, AMX). "
        "Given, that dtype throughout; float16 on a CPU falls back to float32.",
    ),
    _Shared("silence_progress_bars", Optional[bool], True, "hide the progress bar. Default True."),
    _Shared(
        "seed",
        Optional[int],
        42,
        "seeds the run: the initial values of what is trained (a prompt, an adapter) and "
        "the order of the data. Default 42.",
    ),
    _Shared(
        "gradient_checkpointing",
        Optional[bool],
        False,
        "recompute activations to save memory. Default False.",
    ),
    _Shared(
        "validation",
        Optional[ValidationConfig],
        None,
        "split_ratio / split_seed (a validation set cut from the training records), "
        "eval_steps (default: every epoch), accuracy_examples (greedy exact-match on that "
        "many records), early_stopping_patience / _min_delta.",
    ),
    _Shared(
        "optimization",
        Optional[OptimizationConfig],
        None,
        "total_train_batch_size / max_per_device_train_batch_size (derive batch and "
        "accumulation), lr_scaling (none, sqrt, linear), lr_scheduler (linear, cosine, "
        "constant), warmup_steps / warmup_ratio, weight_decay, max_grad_norm, torch_compile.",
    ),
    _Shared(
        "data",
        Optional[DataConfig],
        None,
        "chat_loss for chat records (last_assistant, the default; assistant; all), and a "
        "mixture of training files (mixture, mixture_mode, mixture_size, mixture_seed).",
    ),
    _Shared(
        "checkpoint_steps",
        Optional[int],
        None,
        "save resumable state every N steps into the job's folder.",
    ),
    "*after_checkpoint_steps",
    _Shared(
        "preset",
        Optional[str],
        None,
        "classification, generation or summarization: the defaults it sets for num_epochs, "
        "learning_rate, batch_size and accumulate_steps apply where the request leaves them "
        "unset (see caikit_tuning/training/presets.py).",
    ),
    _Shared(
        "neftune_noise_alpha",
        Optional[float],
        None,
        "NEFTune noise on the input embeddings while training (e.g. 5); unset: none.",
    ),
    _Shared(
        "rope_scaling",
        Optional[RopeScalingConfig],
        None,
        "type (linear, dynamic) and factor (> 1) stretching a rotary model's context; "
        "recorded and applied at inference too.",
    ),
    _Shared(
        "determinism",
        Optional[str],
        None,
        "no, half (default: seeded, cuDNN deterministic) or full (deterministic "
        "implementations only; an op without one raises).",
    ),
)
SHARED_NAMES = tuple(item.name for item in _SHARED if isinstance(item, _Shared))
assert tuple(f.name for f in fields(TrainRequest)) == SHARED_NAMES


def train_api(method: str, after_device: tuple[str, ...] = ()) -> Callable:
    """Decorate a module's train implementation `(cls, request, **own) -> model` (see
    the module docstring); `method` names its defaults in training/presets.py."""

    def decorate(implementation: Callable) -> Callable:
        own = list(inspect.signature(implementation).parameters.values())[2:]
        signature, docs = _public_signature(method, implementation, own, after_device)

        @functools.wraps(implementation)
        def train(cls, *args, **kwargs):
            bound = signature.bind(cls, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["cls"]
            request = TrainRequest(**{name: values.pop(name) for name in SHARED_NAMES})
            return implementation(cls, request, **values)

        def request_from(arguments: dict[str, Any]) -> tuple[TrainRequest, dict[str, Any]]:
            """A call's arguments (e.g. from the runtime, to check them at submission):
            unknown names are an error; missing ones are None, so the checks name them."""
            names = list(signature.parameters)[1:]
            unknown = sorted(set(arguments) - set(names))
            if unknown:
                raise ValueError(f"unknown train parameter(s) {unknown}; valid: {names}.")
            values = {
                name: arguments.get(name, None if p.default is _REQUIRED else p.default)
                for name, p in list(signature.parameters.items())[1:]
            }
            request = TrainRequest(**{name: values.pop(name) for name in SHARED_NAMES})
            return request, values

        train.__signature__ = signature
        train.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        train.__annotations__["return"] = signature.return_annotation
        train.__doc__ = docs
        train.request_from = request_from
        return train

    return decorate


def _public_signature(method: str, implementation: Callable, own: list, after_device: tuple):
    defaults = DEFAULTS[method]
    slots = {"*required": [], "*after_device": [], "*after_checkpoint_steps": []}
    for parameter in own:
        if parameter.default is _REQUIRED:
            slots["*required"].append(parameter)
        elif parameter.name in after_device:
            slots["*after_device"].append(parameter)
        else:
            slots["*after_checkpoint_steps"].append(parameter)
    summary, own_docs, returns = _split_docstring(implementation.__doc__ or "")
    parameters = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    docs = []
    for item in _SHARED:
        if isinstance(item, str):
            for parameter in slots[item]:
                parameters.append(parameter.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
                docs.append((parameter.name, own_docs.get(parameter.name, "")))
            continue
        parameters.append(
            inspect.Parameter(
                item.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=item.default,
                annotation=item.annotation,
            )
        )
        text = item.doc.replace("{epochs}", str(defaults["num_epochs"]))
        docs.append((item.name, text.replace("{lr}", f"{defaults['learning_rate']:g}")))
    signature = inspect.Signature(
        parameters, return_annotation=inspect.signature(implementation).return_annotation
    )
    return signature, _docstring(summary, docs, returns)


def _split_docstring(text: str) -> tuple[str, dict[str, str], str]:
    """(summary, {parameter: its text}, the Returns section) of a Google-style docstring."""
    text, _, returns = inspect.cleandoc(text).partition("\nReturns:\n")
    summary, _, args = text.partition("\nArgs:\n")
    docs: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            docs[name] = match.group(2)
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return summary.strip(), docs, " ".join(returns.split())


def _docstring(summary: str, docs: list[tuple[str, str]], returns: str) -> str:
    lines = [summary, "", "Args:"]
    for name, text in docs:
        lines.extend(_wrapped(f"{name}: {text}", "    ", "        "))
    if returns:
        lines += ["Returns:", *_wrapped(returns, "    ", "    ")]
    return "\n".join(lines)


def _wrapped(text: str, first: str, rest: str, width: int = 88) -> list[str]:
    words, lines, line = text.split(), [], first
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = rest
        line += word + " "
    lines.append(line.rstrip())
    return lines
