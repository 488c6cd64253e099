"""Find and load Hugging Face base models and tokenizers, safely and offline by default."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import alog
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from ..config import library_settings
from ..storage.paths import is_hub_id, resolve_under

log = alog.use_channel("BASE")
_FROM_PRETRAINED = threading.Lock()

# Per-tensor loading bars would flood job logs; the job reports its own progress.
hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class BaseModelSource:
    """Where a base model comes from, as recorded in a saved model's config.

    Exactly one of `name` (resolved under `base_models_dir`, or a hub id when downloads
    are allowed) and `path` (an explicit folder) is set.
    """

    name: str | None = None
    path: str | None = None

    def __post_init__(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("A base model source needs exactly one of `name` and `path`.")

    def to_config(self) -> dict[str, str]:
        return {"name": self.name} if self.name is not None else {"path": self.path}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseModelSource:
        return cls(name=config.get("name"), path=config.get("path"))

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.path)

    @property
    def public_name(self) -> str:
        """The name clients may see: a folder's own name, never its server path."""
        return self.name if self.name is not None else Path(self.path).name


@dataclass(frozen=True)
class LocatedModel:
    source: BaseModelSource
    # A local folder, or a hub id when the model is downloaded.
    location: str
    local: bool


def base_models_dir() -> Path:
    return library_settings().base_models_dir


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def locate_base_model(base_model: str | BaseModelSource, field: str = "base_model") -> LocatedModel:
    """Turn what the user named into a folder (or, when allowed, a hub id).

    A folder path is taken as is, unless `restrict_base_models_to_dir` is on (the
    runtime sets it). Otherwise the value is a name under `base_models_dir`.
    """
    if isinstance(base_model, BaseModelSource):
        if base_model.path is not None:
            return _locate_path(base_model.path, field)
        return _locate_name(base_model.name, field)
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError(f"`{field}` must name a base model folder or name, got {base_model!r}.")
    restricted = library_settings().restrict_base_models_to_dir
    if not restricted and Path(base_model).expanduser().is_dir():
        return _locate_path(base_model, field)
    return _locate_name(base_model, field)


def _locate_path(path: str, field: str) -> LocatedModel:
    folder = Path(path).expanduser().resolve()
    if not _is_model_folder(folder):
        raise ValueError(
            f"`{field}` folder {path} holds no Hugging Face model (config.json is missing)."
        )
    return LocatedModel(BaseModelSource(path=str(folder)), str(folder), local=True)


def _locate_name(name: str, field: str) -> LocatedModel:
    root = base_models_dir()
    folder = resolve_under(root, name, field)
    if _is_model_folder(folder):
        return LocatedModel(BaseModelSource(name=name), str(folder), local=True)
    if library_settings().allow_downloads and is_hub_id(name):
        return LocatedModel(BaseModelSource(name=name), name, local=False)
    raise ValueError(
        f"`{field}` {name!r} was not found: base_models_dir holds no model folder of that "
        "name. Save the model there, pass a model folder path, or set ALLOW_DOWNLOADS=true "
        "to fetch hub models."
    )


def trust_remote_code() -> bool:
    """Only an explicit `trust_remote_code: true` in the config runs a model's own code."""
    return library_settings().trust_remote_code


def load_model_config(located: LocatedModel) -> PretrainedConfig:
    return AutoConfig.from_pretrained(
        located.location, trust_remote_code=trust_remote_code(), local_files_only=located.local
    )


def is_encoder_decoder(config: PretrainedConfig, field: str = "base_model") -> bool:
    """True for seq2seq models, False for causal LMs; anything else is an error."""
    if getattr(config, "is_encoder_decoder", False):
        if config.model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"`{field}` is an encoder-decoder model of type {config.model_type!r} that has "
                "no sequence-to-sequence LM head in transformers."
            )
        return True
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    raise ValueError(
        f"`{field}` is a {config.model_type!r} model, which is neither a causal language model "
        "nor a sequence-to-sequence model; only those can be tuned for text generation."
    )


def hidden_size(config: PretrainedConfig) -> int:
    """Width of the model's token embeddings, from its config."""
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of a {config.model_type!r} model.")


def load_tokenizer(located: LocatedModel) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        located.location, trust_remote_code=trust_remote_code(), local_files_only=located.local
    )
    if tokenizer.pad_token_id is None:
        strategy = library_settings().missing_pad_token
        choices = {
            "eos": tokenizer.eos_token,
            "bos": tokenizer.bos_token,
            "unk": tokenizer.unk_token,
        }
        if choices[strategy] is None:
            raise ValueError(
                f"the tokenizer has no pad token and no {strategy.upper()} token to pad with; "
                f"set `missing_pad_token` to one of {[k for k, v in choices.items() if v]}."
            )
        tokenizer.pad_token = choices[strategy]
    return tokenizer


def rope_scaled(config: PretrainedConfig, rope_scaling: dict | None) -> PretrainedConfig:
    """`config` with its rotary embeddings stretched: {"type": linear|dynamic, "factor": f}."""
    if not rope_scaling:
        return config
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict):
        raise ValueError(
            f"`rope_scaling` applies to models with rotary position embeddings; a "
            f"{config.model_type!r} model has none."
        )
    config.rope_parameters = {
        **parameters,
        "rope_type": rope_scaling["type"],
        "factor": float(rope_scaling["factor"]),
    }
    return config


def load_model(
    located: LocatedModel,
    dtype: torch.dtype,
    device: torch.device,
    quantization_config: Any | None = None,
    rope_scaling: dict | None = None,
) -> PreTrainedModel:
    """Load weights (safetensors only) in `dtype` onto `device`, in eval mode.

    `quantization_config` (a transformers BitsAndBytesConfig) loads the linear layers
    quantized; such weights are placed while loading, as they cannot be moved after."""
    config = rope_scaled(load_model_config(located), rope_scaling)
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    log.info("loading base model %s (%s, %s)", located.source, dtype, device)
    if located.local and not any(Path(located.location).glob("*.safetensors")):
        raise ValueError(
            f"base model {located.source} has no safetensors weights in {located.location}; "
            "only safetensors are loaded (pickled .bin/.pt weights can run code). Convert it "
            "with save_pretrained(..., safe_serialization=True)."
        )
    # transformers builds a model on the meta device and ties its weights afterwards,
    # which is not thread-safe: two loads at once (the runtime loads models on a
    # thread pool) left a tied lm_head.weight on the meta device. One load at a time.
    with _FROM_PRETRAINED:
        model = auto_class.from_pretrained(
            located.location,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code(),
            local_files_only=located.local,
            attn_implementation="sdpa" if _supports_sdpa(auto_class, config) else "eager",
            **(
                {"quantization_config": quantization_config, "device_map": {"": device}}
                if quantization_config is not None
                else {}
            ),
        )
    return (model if quantization_config is not None else model.to(device)).eval()


def _supports_sdpa(auto_class, config: PretrainedConfig) -> bool:
    model_class = auto_class._model_mapping[type(config)]
    return bool(getattr(model_class, "_supports_sdpa", False))


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer, and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: BaseModelSource
    is_encoder_decoder: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_base(
    located: LocatedModel,
    dtype: torch.dtype,
    device: torch.device,
    quantization_config: Any | None = None,
    rope_scaling: dict | None = None,
) -> BaseModel:
    model = load_model(located, dtype, device, quantization_config, rope_scaling)
    return BaseModel(
        model=model,
        tokenizer=load_tokenizer(located),
        source=located.source,
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
    )
