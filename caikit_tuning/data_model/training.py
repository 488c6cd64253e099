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
    # The training outputs' (class labels') token embeddings, then sampled vocabulary.
    LABELS = 4


@dataobject(package=PACKAGE)
class PromptOutputModelType(Enum):
    """Where a soft prompt is placed: before the decoder's input (every model type),
    or before the encoder's input (encoder-decoder models only)."""

    DECODER = 0
    ENCODER = 1


@dataobject(package=PACKAGE)
class TuningConfig(DataObjectBase):
    """How the soft prompt is shaped and initialised.

    prompt_tuning_init_method takes a PromptTuningInitMethod name (RANDOM, TEXT, LABELS,
    ONLY_SOURCE_SHARED, AVERAGE_SOURCE; AVERAGE_SOURCE_TASKS is accepted as an alias).
    LABELS starts from the token embeddings of the training outputs (the class labels).
    output_model_types takes PromptOutputModelType names (DECODER, ENCODER).
    num_ranks is the rank of the task-specific update (MULTITASK_PROMPT_TUNING only).
    """

    num_virtual_tokens: Annotated[int, FieldNumber(1)]
    prompt_tuning_init_method: Annotated[Optional[str], FieldNumber(2)]
    prompt_tuning_init_text: Annotated[Optional[str], FieldNumber(3)]
    prompt_tuning_init_source_model: Annotated[Optional[str], FieldNumber(4)]
    output_model_types: Annotated[Optional[List[str]], FieldNumber(5)]
    num_ranks: Annotated[Optional[int], FieldNumber(6)]


@dataobject(package=PACKAGE)
class ValidationConfig(DataObjectBase):
    """How a training job is validated and when it stops early.

    split_ratio takes that share of the training records for validation when no
    val_stream is given (split with split_seed). Validation runs every eval_steps
    optimizer steps, or after every epoch when unset: loss, perplexity and, on up to
    accuracy_examples records, greedy exact-match accuracy. With
    early_stopping_patience, training stops after that many validations without an
    improvement of at least early_stopping_min_delta, and the best weights are kept.
    """

    split_ratio: Annotated[Optional[float], FieldNumber(1)]
    split_seed: Annotated[Optional[int], FieldNumber(2)]
    eval_steps: Annotated[Optional[int], FieldNumber(3)]
    accuracy_examples: Annotated[Optional[int], FieldNumber(4)]
    early_stopping_patience: Annotated[Optional[int], FieldNumber(5)]
    early_stopping_min_delta: Annotated[Optional[float], FieldNumber(6)]


@dataobject(package=PACKAGE)
class OptimizationConfig(DataObjectBase):
    """Batch sizing and learning-rate schedule.

    total_train_batch_size with max_per_device_train_batch_size derives the micro-batch
    and the gradient accumulation (over all processes) instead of batch_size and
    accumulate_steps. lr_scaling (none, sqrt, linear) multiplies learning_rate by the
    total batch size (or its square root). lr_scheduler: linear, cosine or constant,
    after warmup_steps (or warmup_ratio of all steps) of linear warmup. torch_compile
    compiles the model's forward for the run (for GPUs: on a CPU the compiler takes
    minutes and gains little).
    """

    total_train_batch_size: Annotated[Optional[int], FieldNumber(1)]
    max_per_device_train_batch_size: Annotated[Optional[int], FieldNumber(2)]
    lr_scaling: Annotated[Optional[str], FieldNumber(3)]
    lr_scheduler: Annotated[Optional[str], FieldNumber(4)]
    warmup_steps: Annotated[Optional[int], FieldNumber(5)]
    warmup_ratio: Annotated[Optional[float], FieldNumber(6)]
    weight_decay: Annotated[Optional[float], FieldNumber(7)]
    max_grad_norm: Annotated[Optional[float], FieldNumber(8)]
    torch_compile: Annotated[Optional[bool], FieldNumber(9)]


@dataobject(package=PACKAGE)
class DatasetSource(DataObjectBase):
    """One file of a dataset mixture and its sampling weight."""

    file: Annotated[str, FieldNumber(1)]
    weight: Annotated[Optional[float], FieldNumber(2)]


@dataobject(package=PACKAGE)
class DataConfig(DataObjectBase):
    """How records become training examples.

    chat_loss, for chat records ({"messages": [...]}): last_assistant (default: learn
    the final answer), assistant (every assistant turn) or all (every token).
    mixture: training files (JSON / JSONL / CSV) used instead of train_stream, either
    concatenated (mixture_mode concatenate, the default) or sampled by weight with
    mixture_seed (mixture_mode sample; mixture_size records, default: as many as all
    files hold).
    """

    chat_loss: Annotated[Optional[str], FieldNumber(1)]
    mixture: Annotated[Optional[List[DatasetSource]], FieldNumber(2)]
    mixture_mode: Annotated[Optional[str], FieldNumber(3)]
    mixture_size: Annotated[Optional[int], FieldNumber(4)]
    mixture_seed: Annotated[Optional[int], FieldNumber(5)]


@dataobject(package=PACKAGE)
class RopeScalingConfig(DataObjectBase):
    """Stretch a rotary-position model's context when loading it: `type` linear or
    dynamic (NTK), by `factor` (> 1). Recorded with the model and applied at inference."""

    type: Annotated[Optional[str], FieldNumber(1)]
    factor: Annotated[Optional[float], FieldNumber(2)]
