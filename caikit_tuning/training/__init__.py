"""The training loop shared by every tuning method, and the choices it rests on."""

from .devices import autocast_dtype, resolve_device, resolve_dtype, seed_everything
from .loop import TrainingResult, train
from .loss import summed_token_loss
from .settings import TrainingSettings

__all__ = [
    "TrainingResult",
    "TrainingSettings",
    "autocast_dtype",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
    "summed_token_loss",
    "train",
]
