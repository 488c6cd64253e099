"""caikit_tuning: parameter-efficient tuning and text generation as caikit modules."""

from pathlib import Path

import caikit

# Library defaults first, so the runtime's config and environment variables override them.
caikit.configure(str(Path(__file__).parent / "config" / "config.yml"))

from . import data_model, modules  # noqa: E402
from .data_model import (  # noqa: E402
    GenerationTrainRecord,
    TrainGenerationRecord,
    TuningConfig,
)
from .modules import PeftPromptTuning, TextGeneration  # noqa: E402

__all__ = [
    "GenerationTrainRecord",
    "PeftPromptTuning",
    "TextGeneration",
    "TrainGenerationRecord",
    "TuningConfig",
    "data_model",
    "modules",
]
