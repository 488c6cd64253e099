"""Training inputs: records, tuning configuration and the closed choices they name."""

from enum import Enum
from typing import List, Optional

from caikit.core import DataObjectBase, dataobject
from py_to_proto.dataclass_to_proto import Annotated, FieldNumber

from .package import PACKAGE


@dataobject(package=PACKAGE)
class TrainGenerationRecord(DataObjectBase):
    """One training example: the text the model sees and the text it should produce."""

    input: Annotated[str, FieldNumber(1)]
    output: Annotated[str, FieldNumber(2)]


# caikit-nlp spells the record this way; code written for it keeps working.
GenerationTrainRecord = TrainGenerationRecord


@dataobject(package=PACKAGE)
class TuningType(Enum):
    PROMPT_TUNING = 0
    MULTITASK_PROMPT_TUNING = 1


@dataobject(package=PACKAGE)
class PromptTuningInitMethod(Enum):
    RANDOM = 0
    TEXT = 1
    ONLY_SOURCE_SHARED = 2
    AVERAGE_SOURCE = 3


@dataobject(package=PACKAGE)
class PromptOutputModelType(Enum):
    """Where a soft prompt is placed: before the decoder's input (every model type),
    or before the encoder's input (encoder-decoder models only)."""

    DECODER = 0
    ENCODER = 1


@dataobject(package=PACKAGE)
class TuningConfig(DataObjectBase):
    """How the soft prompt is shaped and initialised.

    prompt_tuning_init_method takes a PromptTuningInitMethod name (RANDOM, TEXT,
    ONLY_SOURCE_SHARED, AVERAGE_SOURCE; AVERAGE_SOURCE_TASKS is accepted as an alias).
    output_model_types takes PromptOutputModelType names (DECODER, ENCODER).
    """

    num_virtual_tokens: Annotated[int, FieldNumber(1)]
    prompt_tuning_init_method: Annotated[Optional[str], FieldNumber(2)]
    prompt_tuning_init_text: Annotated[Optional[str], FieldNumber(3)]
    prompt_tuning_init_source_model: Annotated[Optional[str], FieldNumber(4)]
    output_model_types: Annotated[Optional[List[str]], FieldNumber(5)]
