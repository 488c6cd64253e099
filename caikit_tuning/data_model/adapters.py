"""Weight-adapter inputs: which adapter is trained (LoRA, AdaLoRA, IA3) and how the
frozen base model may be quantized under it (QLoRA)."""

from enum import Enum
from typing import List, Optional

from caikit.core import DataObjectBase, dataobject
from py_to_proto.dataclass_to_proto import Annotated, FieldNumber

from .package import PACKAGE


@dataobject(package=PACKAGE)
class AdapterType(Enum):
    LORA = 0
    ADALORA = 1
    IA3 = 2


@dataobject(package=PACKAGE)
class QuantizationType(Enum):
    """4-bit data types of bitsandbytes: NormalFloat4 (QLoRA's) or plain float4."""

    NF4 = 0
    FP4 = 1


@dataobject(package=PACKAGE)
class AdapterConfig(DataObjectBase):
    """The adapter trained on top of a frozen base model; every field is optional, and
    0, false or empty means "the default" (proto3 cannot tell them from unset).

    adapter_type takes an AdapterType name (LORA, the default; ADALORA; IA3). Each type
    takes only its own fields; a field of another type is an error naming the valid ones.

    LORA: r (rank, default 8), alpha (default 2 * r), dropout (default 0),
    target_modules (default: the attention query/value projections, found from the
    model), bias (none, all, lora_only; default none), use_rslora, use_dora.
    ADALORA: init_r (default 12) pruned towards an average target_r (default 8) between
    step tinit (default 0) and total_step - tfinal (default 0), re-allocated every delta_t
    steps (default 1) from sensitivities smoothed by beta1 / beta2 (default 0.85);
    orth_reg_weight (default 0.5) weighs the orthogonality penalty; total_step defaults to
    the run's optimizer steps; alpha (default 2 * init_r), dropout, target_modules, bias.
    IA3: target_modules (default: attention key/value projections and the MLP output
    projection) and feedforward_modules (default: the MLP output projection; must be
    among target_modules).
    """

    adapter_type: Annotated[Optional[str], FieldNumber(1)]
    r: Annotated[Optional[int], FieldNumber(2)]
    alpha: Annotated[Optional[int], FieldNumber(3)]
    dropout: Annotated[Optional[float], FieldNumber(4)]
    target_modules: Annotated[Optional[List[str]], FieldNumber(5)]
    bias: Annotated[Optional[str], FieldNumber(6)]
    use_rslora: Annotated[Optional[bool], FieldNumber(7)]
    use_dora: Annotated[Optional[bool], FieldNumber(8)]
    target_r: Annotated[Optional[int], FieldNumber(9)]
    init_r: Annotated[Optional[int], FieldNumber(10)]
    tinit: Annotated[Optional[int], FieldNumber(11)]
    tfinal: Annotated[Optional[int], FieldNumber(12)]
    delta_t: Annotated[Optional[int], FieldNumber(13)]
    beta1: Annotated[Optional[float], FieldNumber(14)]
    beta2: Annotated[Optional[float], FieldNumber(15)]
    orth_reg_weight: Annotated[Optional[float], FieldNumber(16)]
    total_step: Annotated[Optional[int], FieldNumber(17)]
    feedforward_modules: Annotated[Optional[List[str]], FieldNumber(18)]


@dataobject(package=PACKAGE)
class QuantizationConfig(DataObjectBase):
    """Load the frozen base model quantized by bitsandbytes (needs a CUDA GPU).

    bits: 4 (the default, QLoRA) or 8. The 4-bit fields: quant_type (a QuantizationType
    name, NF4 by default), double_quant (also quantize the quantization constants,
    default false) and compute_dtype (bfloat16, the default; float16 or float32).
    """

    bits: Annotated[Optional[int], FieldNumber(1)]
    quant_type: Annotated[Optional[str], FieldNumber(2)]
    double_quant: Annotated[Optional[bool], FieldNumber(3)]
    compute_dtype: Annotated[Optional[str], FieldNumber(4)]
