"""Weight adapters: LoRA, AdaLoRA and IA3 trained on a frozen base model."""

from .lora_tuning import LoraTuning
from .quantization import QuantizationSettings, bitsandbytes_kwargs
from .settings import AdapterSettings

__all__ = ["AdapterSettings", "LoraTuning", "QuantizationSettings", "bitsandbytes_kwargs"]
