"""Quantized base models (QLoRA): bitsandbytes 4-bit or 8-bit weights under the adapter.

Building the bitsandbytes arguments is a pure function of the settings, so it is tested
anywhere; loading needs a CUDA GPU and the bitsandbytes package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import alog
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ...base_models import (
    BaseModel,
    LocatedModel,
    is_encoder_decoder,
    load_model_config,
    load_tokenizer,
    trust_remote_code,
)
from ...data_model.adapters import QuantizationConfig, QuantizationType
from ...data_model.values import choice, flag, member, message_fields

log = alog.use_channel("QLORA")

FIELD = "quantization"
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
_FOUR_BIT_FIELDS = ("quant_type", "double_quant", "compute_dtype")
_FIELDS = tuple(QuantizationConfig.fields)


@dataclass(frozen=True)
class QuantizationSettings:
    bits: int = 4
    # The 4-bit settings; None for 8-bit.
    quant_type: QuantizationType | None = QuantizationType.NF4
    double_quant: bool | None = False
    compute_dtype: str | None = "bfloat16"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"`{FIELD}.bits` must be 4 or 8, got {self.bits!r}.")
        if self.bits == 8:
            for name in _FOUR_BIT_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{FIELD}.{name}` only applies to 4-bit quantization; bits 8 takes "
                        "['bits']."
                    )
            return
        flag(self.double_quant, f"{FIELD}.double_quant")
        dtype = choice(self.compute_dtype, f"{FIELD}.compute_dtype", COMPUTE_DTYPES)
        object.__setattr__(self, "compute_dtype", dtype)

    @classmethod
    def from_request(cls, quantization: Any) -> QuantizationSettings | None:
        """None when the request asks for no quantization."""
        if quantization is None:
            return None
        values = message_fields(quantization, _FIELDS, FIELD)
        bits = values.pop("bits", 4)
        if bits == 8:
            # The 4-bit fields must stay unset; __post_init__ names any that is not.
            return cls(bits=8, **{**dict.fromkeys(_FOUR_BIT_FIELDS), **values})
        if "quant_type" in values:
            values["quant_type"] = member(
                values["quant_type"], QuantizationType, f"{FIELD}.quant_type"
            )
        return cls(bits=bits, **values)

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        config["quant_type"] = self.quant_type.name if self.quant_type else None
        return config


def bitsandbytes_kwargs(settings: QuantizationSettings) -> dict[str, Any]:
    """The keyword arguments of transformers' BitsAndBytesConfig for `settings`."""
    if settings.bits == 8:
        return {"load_in_8bit": True}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": settings.quant_type.name.lower(),
        "bnb_4bit_use_double_quant": settings.double_quant,
        "bnb_4bit_compute_dtype": getattr(torch, settings.compute_dtype),
    }


def check_quantization_possible(device: torch.device) -> None:
    """bitsandbytes kernels run on CUDA GPUs only: say so before anything is loaded."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"`{FIELD}` needs a CUDA GPU (bitsandbytes 4/8-bit kernels) and this machine has "
            "none; leave `quantization` unset to train on the unquantized base model."
        )
    if device.type != "cuda":
        raise ValueError(f"`{FIELD}` needs `device` to be a CUDA GPU, got {device}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"`{FIELD}` needs the bitsandbytes package: pip install bitsandbytes, or leave "
            "`quantization` unset."
        )


def load_quantized_base(
    located: LocatedModel, settings: QuantizationSettings, device: torch.device
) -> BaseModel:
    """The base model with bitsandbytes-quantized linear layers, ready for k-bit training.

    Interim: base_models.load_model should take the quantization config itself (see the
    LoRA module's notes); this mirrors its safety rules (safetensors only, no remote code).
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = load_model_config(located)
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    if located.local and not any(Path(located.location).glob("*.safetensors")):
        raise ValueError(
            f"base model {located.source} has no safetensors weights in {located.location}; "
            "only safetensors are loaded."
        )
    kwargs = bitsandbytes_kwargs(settings)
    log.info("loading base model %s quantized: %s", located.source, kwargs)
    model = auto_class.from_pretrained(
        located.location,
        quantization_config=BitsAndBytesConfig(**kwargs),
        dtype=kwargs.get("bnb_4bit_compute_dtype", torch.float16),
        # Quantized weights cannot be moved after loading: place them while loading.
        device_map={"": device.index or 0},
        use_safetensors=True,
        trust_remote_code=trust_remote_code(),
        local_files_only=located.local,
    )
    # Casts norms to float32 and lets gradients reach the adapters through frozen
    # quantized layers; gradient checkpointing stays the training settings' choice.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return BaseModel(
        model=model.eval(),
        tokenizer=load_tokenizer(located),
        source=located.source,
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
    )
