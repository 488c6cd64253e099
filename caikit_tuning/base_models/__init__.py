"""Base models: where a named model is, how it loads, and one shared copy of each."""

from .loading import (
    BaseModel,
    BaseModelSource,
    LocatedModel,
    hidden_size,
    is_encoder_decoder,
    load_base,
    load_model,
    load_model_config,
    load_tokenizer,
    locate_base_model,
    rope_scaled,
    trust_remote_code,
)
from .registry import load_shared, served_model_info

__all__ = [
    "BaseModel",
    "BaseModelSource",
    "LocatedModel",
    "hidden_size",
    "is_encoder_decoder",
    "load_base",
    "load_model",
    "load_model_config",
    "load_shared",
    "load_tokenizer",
    "locate_base_model",
    "rope_scaled",
    "served_model_info",
    "trust_remote_code",
]
