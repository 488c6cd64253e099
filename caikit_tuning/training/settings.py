"""The training knobs every tuning method shares, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{field}` must be an integer, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{field}` must be >= {minimum}, got {value}.")
    return value


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
    # Batches of similar lengths waste less compute on padding.
    group_by_length: bool = True
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # Loss values are read back from the device every this many optimizer steps.
    logging_steps: int = 10

    def __post_init__(self):
        _int(self.num_epochs, "num_epochs", 1)
        _int(self.batch_size, "batch_size", 1)
        _int(self.accumulate_steps, "accumulate_steps", 1)
        _int(self.max_source_length, "max_source_length", 1)
        _int(self.max_target_length, "max_target_length", 2)
        _int(self.seed, "seed", 0)
        _int(self.logging_steps, "logging_steps", 1)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"`learning_rate` must be a number > 0, got {lr!r}.")

    @classmethod
    def from_request(cls, **values: Any) -> TrainingSettings:
        """Build from a request's parameters; None means "use the default"."""
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_config(self) -> dict[str, Any]:
        return asdict(self)
