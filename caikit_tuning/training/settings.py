"""The training knobs every tuning method shares, validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data_model.values import choice, integer, message_fields, number

SCHEDULERS = ("linear", "cosine", "constant")
LR_SCALINGS = ("none", "sqrt", "linear")
CHAT_LOSSES = ("last_assistant", "assistant", "all")
DETERMINISM = ("no", "half", "full")


def _fields_of(config: Any, cls: type, name: str) -> dict[str, Any]:
    """A request's config message (dataobject or dict) as the fields of `cls` it sets."""
    return message_fields(config, [f.name for f in fields(cls)], name)


@dataclass(frozen=True)
class ValidationSettings:
    split_ratio: float = 0.0
    split_seed: int = 0
    # None: validate after every epoch.
    eval_steps: int | None = None
    accuracy_examples: int = 0
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0

    def __post_init__(self):
        number(self.split_ratio, "validation.split_ratio", 0.0, 0.9)
        integer(self.split_seed, "validation.split_seed", 0)
        if self.eval_steps is not None:
            integer(self.eval_steps, "validation.eval_steps", 1)
        integer(self.accuracy_examples, "validation.accuracy_examples", 0)
        if self.early_stopping_patience is not None:
            integer(self.early_stopping_patience, "validation.early_stopping_patience", 1)
        number(self.early_stopping_min_delta, "validation.early_stopping_min_delta", 0.0, math.inf)

    @classmethod
    def from_request(cls, config: Any) -> ValidationSettings:
        return cls(**_fields_of(config, cls, "validation"))


@dataclass(frozen=True)
class OptimizationSettings:
    total_train_batch_size: int | None = None
    max_per_device_train_batch_size: int | None = None
    lr_scaling: str = "none"
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    # Clip the gradient norm, as transformers.Trainer does by default.
    max_grad_norm: float | None = 1.0
    # torch.compile the model's forward for the run (dynamic shapes). Worth it on GPUs;
    # on a CPU the first step waits minutes for the compiler (see benchmarks/results).
    torch_compile: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("total_train_batch_size", "max_per_device_train_batch_size"):
            if getattr(self, name) is not None:
                integer(getattr(self, name), f"optimization.{name}", 1)
        if self.max_per_device_train_batch_size is not None and self.total_train_batch_size is None:
            raise ValueError(
                "`optimization.max_per_device_train_batch_size` needs "
                "`optimization.total_train_batch_size`; without it use batch_size."
            )
        set_("lr_scaling", choice(self.lr_scaling, "optimization.lr_scaling", LR_SCALINGS))
        set_("lr_scheduler", choice(self.lr_scheduler, "optimization.lr_scheduler", SCHEDULERS))
        integer(self.warmup_steps, "optimization.warmup_steps", 0)
        number(self.warmup_ratio, "optimization.warmup_ratio", 0.0, 0.99)
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                "give `optimization.warmup_steps` or `optimization.warmup_ratio`, not both."
            )
        number(self.weight_decay, "optimization.weight_decay", 0.0, 1.0)
        if self.max_grad_norm is not None:
            number(self.max_grad_norm, "optimization.max_grad_norm", 0.0, math.inf, low_open=True)
        if not isinstance(self.torch_compile, bool):
            raise ValueError(
                f"`optimization.torch_compile` must be true or false, got {self.torch_compile!r}."
            )

    @classmethod
    def from_request(cls, config: Any) -> OptimizationSettings:
        return cls(**_fields_of(config, cls, "optimization"))


@dataclass(frozen=True)
class _DataFields:
    """The fields of a request's `data` config (they live on TrainingSettings)."""

    chat_loss: str = "last_assistant"
    mixture: tuple = ()
    mixture_mode: str = "concatenate"
    mixture_size: int | None = None
    mixture_seed: int = 0


MIXTURE_MODES = ("concatenate", "sample")


def _mixture(value: Any) -> tuple[tuple[str, float], ...]:
    """(file, weight) pairs from a request's mixture (dataobjects, dicts or pairs)."""
    sources = []
    for index, item in enumerate(value or ()):
        if isinstance(item, tuple):
            item = {"file": item[0], "weight": item[1]}
        file = item.get("file") if isinstance(item, dict) else getattr(item, "file", None)
        weight = item.get("weight") if isinstance(item, dict) else getattr(item, "weight", None)
        if not isinstance(file, str) or not file:
            raise ValueError(
                f"`data.mixture[{index}].file` must name a training file, got {file!r}."
            )
        weight = 1.0 if weight in (None, 0) else weight
        number(weight, f"data.mixture[{index}].weight", 0.0, math.inf, low_open=True)
        sources.append((file, float(weight)))
    return tuple(sources)


@dataclass(frozen=True)
class TrainingSettings:
    num_epochs: int = 20
    learning_rate: float = 0.3
    batch_size: int = 8
    accumulate_steps: int = 1
    max_source_length: int = 256
    max_target_length: int = 128
    seed: int = 42
    silence_progress_bars: bool = True
    # Causal LMs: each micro-batch packed into one row, no padding. Batches keep a
    # random composition: sorting by length (group_by_length) also cuts padding but
    # was measured to cost quality (see benchmarks/results).
    packing: bool = True
    # Padded batches only (seq2seq, or packing off): batches of similar lengths.
    group_by_length: bool = False
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # Loss values are read back from the device every this many optimizer steps.
    logging_steps: int = 10
    # Save a resumable checkpoint every this many optimizer steps (where a checkpoint
    # folder is set, see training.checkpoints).
    checkpoint_steps: int | None = None
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    # Chat records: learn the last assistant turn, every assistant turn, or all tokens.
    chat_loss: str = "last_assistant"
    # Training files mixed instead of a train_stream: ((file, weight), ...).
    mixture: tuple = ()
    mixture_mode: str = "concatenate"
    mixture_size: int | None = None
    mixture_seed: int = 0
    # The task-type preset that filled the knobs left unset (recorded, see training/presets).
    preset: str | None = None
    # NEFTune: uniform noise of this scale on the input token embeddings while training.
    neftune_noise_alpha: float | None = None
    # no: fast kernels; half: seeded and cuDNN-deterministic; full: deterministic
    # implementations only (an op without one raises).
    determinism: str = "half"
    # Data-parallel processes sharing the global batch (set by the launcher, not users).
    num_processes: int = 1

    def __post_init__(self):
        # 0: no training at all (caikit-nlp accepts it and keeps the initial weights).
        integer(self.num_epochs, "num_epochs", 0)
        integer(self.batch_size, "batch_size", 1)
        integer(self.accumulate_steps, "accumulate_steps", 1)
        integer(self.max_source_length, "max_source_length", 1)
        integer(self.max_target_length, "max_target_length", 2)
        integer(self.seed, "seed", 0)
        integer(self.logging_steps, "logging_steps", 1)
        integer(self.num_processes, "num_processes", 1)
        if self.checkpoint_steps is not None:
            integer(self.checkpoint_steps, "checkpoint_steps", 1)
        number(self.learning_rate, "learning_rate", 0.0, math.inf, low_open=True)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("chat_loss", choice(self.chat_loss, "data.chat_loss", CHAT_LOSSES))
        set_("determinism", choice(self.determinism, "determinism", DETERMINISM))
        if self.neftune_noise_alpha is not None:
            number(self.neftune_noise_alpha, "neftune_noise_alpha", 0.0, math.inf)
        set_("mixture", _mixture(self.mixture))
        set_("mixture_mode", choice(self.mixture_mode, "data.mixture_mode", MIXTURE_MODES))
        if self.mixture_size is not None:
            integer(self.mixture_size, "data.mixture_size", 1)
        integer(self.mixture_seed, "data.mixture_seed", 0)
        total = self.optimization.total_train_batch_size
        if total is not None:
            if self.accumulate_steps != 1:
                raise ValueError(
                    "give `accumulate_steps` or `optimization.total_train_batch_size`, not both: "
                    "the accumulation is derived from the total batch size."
                )
            if total % self.num_processes:
                raise ValueError(
                    f"`optimization.total_train_batch_size` ({total}) must be a multiple of the "
                    f"number of processes ({self.num_processes})."
                )
            per_process = total // self.num_processes
            if per_process % self.micro_batch_size:
                raise ValueError(
                    f"`optimization.total_train_batch_size` ({total}) must be a multiple of "
                    f"processes x micro-batch ({self.num_processes} x {self.micro_batch_size})."
                )

    @property
    def micro_batch_size(self) -> int:
        """Records per forward pass on one process."""
        total = self.optimization.total_train_batch_size
        if total is None:
            return self.batch_size
        per_process = max(1, total // self.num_processes)
        cap = self.optimization.max_per_device_train_batch_size or per_process
        return min(cap, per_process)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on one process."""
        total = self.optimization.total_train_batch_size
        if total is None:
            return self.accumulate_steps
        return total // self.num_processes // self.micro_batch_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.num_processes

    @property
    def peak_learning_rate(self) -> float:
        scaling = self.optimization.lr_scaling
        factor = {
            "none": 1.0,
            "sqrt": math.sqrt(self.global_batch_size),
            "linear": self.global_batch_size,
        }
        return self.learning_rate * factor[scaling]

    @classmethod
    def from_request(
        cls, validation: Any = None, optimization: Any = None, data: Any = None, **values: Any
    ) -> TrainingSettings:
        """Build from a request's parameters; None means "use the default"."""
        data_values = _fields_of(data, _DataFields, "data")
        return cls(
            validation=ValidationSettings.from_request(validation),
            optimization=OptimizationSettings.from_request(optimization),
            **data_values,
            **{k: v for k, v in values.items() if v is not None},
        )

    def to_config(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "micro_batch_size": self.micro_batch_size,
            "accumulation": self.accumulation,
            "global_batch_size": self.global_batch_size,
            "peak_learning_rate": self.peak_learning_rate,
        }
