"""Base models: where they are, how they load, how artifacts are written."""

from .artifacts import atomic_folder, read_jsonl, write_jsonl
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
from .paths import resolve_under
from .prefix import NO_PREFIX, PromptPrefix, embed_with_prefix
from .registry import load_shared

__all__ = [
    "NO_PREFIX",
    "BaseModel",
    "BaseModelSource",
    "LocatedModel",
    "PromptPrefix",
    "atomic_folder",
    "embed_with_prefix",
    "hidden_size",
    "is_encoder_decoder",
    "load_base",
    "load_model",
    "load_model_config",
    "load_shared",
    "load_tokenizer",
    "locate_base_model",
    "read_jsonl",
    "resolve_under",
    "rope_scaled",
    "trust_remote_code",
    "write_jsonl",
]
