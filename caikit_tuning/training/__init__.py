"""The training loop shared by every tuning method, and the choices it rests on."""

from .checkpoints import checkpointing
from .devices import autocast_dtype, resolve_device, resolve_dtype, seed_everything
from .loop import TrainingResult, evaluate_loss, total_steps, train
from .loss import summed_token_loss
from .settings import OptimizationSettings, TrainingSettings, ValidationSettings

__all__ = [
    "OptimizationSettings",
    "TrainingResult",
    "TrainingSettings",
    "ValidationSettings",
    "autocast_dtype",
    "checkpointing",
    "evaluate_loss",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
    "summed_token_loss",
    "total_steps",
    "train",
]
