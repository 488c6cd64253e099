"""Wire types of caikit_tuning: the @dataobject messages the runtime exposes.

Nothing here imports torch: these types are used by clients and servers alike.
Results reuse caikit.interfaces.nlp (GeneratedTextResult, GeneratedTextStreamResult,
TokenizationResults).
"""

from .adapters import AdapterConfig, AdapterType, QuantizationConfig, QuantizationType
from .generation import DecodingMethod, ExponentialDecayLengthPenalty
from .training import (
    DataConfig,
    DatasetSource,
    GenerationTrainRecord,
    OptimizationConfig,
    PromptOutputModelType,
    PromptTuningInitMethod,
    RopeScalingConfig,
    TrainGenerationRecord,
    TuningConfig,
    TuningType,
    ValidationConfig,
)

__all__ = [
    "AdapterConfig",
    "AdapterType",
    "DataConfig",
    "DatasetSource",
    "DecodingMethod",
    "ExponentialDecayLengthPenalty",
    "GenerationTrainRecord",
    "OptimizationConfig",
    "PromptOutputModelType",
    "PromptTuningInitMethod",
    "QuantizationConfig",
    "QuantizationType",
    "RopeScalingConfig",
    "TrainGenerationRecord",
    "TuningConfig",
    "TuningType",
    "ValidationConfig",
]
