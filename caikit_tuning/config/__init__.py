"""The library's settings, read from caikit's config into one typed object.

`config.yml` next to this file holds the defaults (each key commented); a runtime
config, `caikit.configure(...)` calls and environment variables override them. Code
asks `library_settings()` instead of reading config keys itself: each key is read,
checked and given its default here, once per configuration (caikit replaces its
config object whenever it is configured again).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import caikit

from ..data_model.values import choice, flag, integer

PAD_STRATEGIES = ("eos", "bos", "unk")


@dataclass(frozen=True)
class GenerationServing:
    """How generation is served (config `generation`)."""

    batching: bool = True
    max_batch_size: int = 16
    max_queue_size: int = 64
    max_num_beams: int = 8
    # 0: no limit beyond the request body's size.
    max_input_characters: int = 1_000_000
    # Adapters attached to one shared base model at most (least recently used go first).
    max_adapters: int = 64
    max_adapter_bytes: int = 2**30


@dataclass(frozen=True)
class LibrarySettings:
    base_models_dir: Path = Path("models/base")
    restrict_base_models_to_dir: bool = False
    allow_downloads: bool = False
    trust_remote_code: bool = False
    source_prompt_base: Path = Path("models/source_prompts")
    export_tgis_prompts: bool = False
    torch_dtype: str | None = None
    missing_pad_token: str = "eos"
    max_training_records: int = 0
    # caikit-nlp's per-module, per-base-model record limits (see config.yml).
    training_data_limit: dict = field(default_factory=dict)
    # Where training files named in requests are read from (the runtime's).
    file_source_base: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "caikit_tuning"
    generation: GenerationServing = field(default_factory=GenerationServing)

    @classmethod
    def from_config(cls, config: Any) -> LibrarySettings:
        # An environment variable named after a top-level key wins, as caikit applies
        # them; read here too, so one set after the configuration applies as well.
        config = {**dict(config), **_environment()}
        generation = dict(config.get("generation") or {})
        mlflow = dict(dict(config.get("tracking") or {}).get("mlflow") or {})
        return cls(
            base_models_dir=Path(config.get("base_models_dir") or "models/base"),
            restrict_base_models_to_dir=_flag(config, "restrict_base_models_to_dir"),
            allow_downloads=_flag(config, "allow_downloads"),
            # Only an explicit true runs a model's own code.
            trust_remote_code=_flag(config, "trust_remote_code"),
            source_prompt_base=Path(config.get("source_prompt_base") or "."),
            export_tgis_prompts=_flag(config, "export_tgis_prompts"),
            torch_dtype=config.get("torch_dtype") or None,
            missing_pad_token=choice(
                str(config.get("missing_pad_token") or "eos"), "missing_pad_token", PAD_STRATEGIES
            ),
            max_training_records=integer(
                int(config.get("max_training_records") or 0), "max_training_records", 0
            ),
            training_data_limit=dict(config.get("training_data_limit") or {}),
            file_source_base=dict(config.get("data_streams") or {}).get("file_source_base"),
            mlflow_tracking_uri=mlflow.get("tracking_uri") or None,
            mlflow_experiment=mlflow.get("experiment") or "caikit_tuning",
            generation=GenerationServing(
                batching=_flag(generation, "batching", True, "generation.batching"),
                **{
                    name: integer(
                        int(generation.get(name) or default),
                        f"generation.{name}",
                        0 if name == "max_input_characters" else 1,
                    )
                    for name, default in (
                        ("max_batch_size", 16),
                        ("max_queue_size", 64),
                        ("max_num_beams", 8),
                        ("max_input_characters", 1_000_000),
                        ("max_adapters", 64),
                        ("max_adapter_bytes", 2**30),
                    )
                },
            ),
        )


def _flag(config: Any, key: str, default: bool = False, name: str | None = None) -> bool:
    """A yes/no key; environment variables arrive as strings ("true", "1")."""
    value = config.get(key, default)
    if isinstance(value, str):
        value = value.strip().lower() in ("1", "true", "yes", "on")
    return flag(bool(value) if value is None else value, name or key)


# Top-level keys that take their value from an environment variable of their name.
_ENVIRONMENT_KEYS = (
    "base_models_dir",
    "restrict_base_models_to_dir",
    "allow_downloads",
    "trust_remote_code",
    "source_prompt_base",
    "export_tgis_prompts",
    "torch_dtype",
    "missing_pad_token",
    "max_training_records",
)


def _environment() -> dict[str, str]:
    return {key: os.environ[key.upper()] for key in _ENVIRONMENT_KEYS if key.upper() in os.environ}


_CACHE: tuple[Any, dict, LibrarySettings] | None = None
_LOCK = threading.Lock()


def library_settings() -> LibrarySettings:
    """The settings of the current caikit configuration (and environment)."""
    global _CACHE
    config, environment = caikit.get_config(), _environment()
    cached = _CACHE
    if cached is not None and cached[0] is config and cached[1] == environment:
        return cached[2]
    with _LOCK:
        settings = LibrarySettings.from_config(config)
        _CACHE = (config, environment, settings)
    return settings
