"""caikit_tuning: parameter-efficient tuning and text generation as caikit modules."""

import os
from pathlib import Path

# OpenMP threads that spin between parallel regions starve every other thread and
# process on the same cores: the serving engine's thread, training workers next to the
# server, a shared machine. Sleeping instead costs little per region. Must be set
# before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import caikit  # noqa: E402

# Library defaults first, so the runtime's config and environment variables override them.
caikit.configure(str(Path(__file__).parent / "config" / "config.yml"))

from . import data_model, modules  # noqa: E402
from .data_model import (  # noqa: E402
    AdapterConfig,
    GenerationTrainRecord,
    QuantizationConfig,
    TrainGenerationRecord,
    TuningConfig,
)
from .modules import (  # noqa: E402
    InContextLearning,
    LoraTuning,
    PeftPromptTuning,
    TextGeneration,
)

__all__ = [
    "AdapterConfig",
    "GenerationTrainRecord",
    "InContextLearning",
    "LoraTuning",
    "PeftPromptTuning",
    "QuantizationConfig",
    "TextGeneration",
    "TrainGenerationRecord",
    "TuningConfig",
    "data_model",
    "modules",
]
