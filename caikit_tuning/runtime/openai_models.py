"""The models the OpenAI routes serve: `/v1/models`' list, read from local_models_dir at
each call (a model trained after start-up is listed at once), and the loaded module for
a request's `model` (through caikit's model manager, which loads it on first use)."""

from __future__ import annotations

from pathlib import Path

import yaml
from caikit.runtime.model_management.model_manager import ModelManager
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException
from grpc import StatusCode

from ..modules.caikit_nlp import TEXT_GENERATION_ID
from ..storage.folders import MODEL_CONFIG
from .names import MAX_PARTS, check_model_name
from .openai_requests import OpenAIError
from .settings import runtime_folders

OWNER = "caikit_tuning"

_DESCRIBED: dict[Path, tuple[float, dict]] = {}


def list_models() -> list[dict]:
    """Every model folder in local_models_dir that inference may name, as OpenAI's model
    objects; models saved after start-up are listed at once."""
    root = Path(runtime_folders().local_models_dir)
    if not root.is_dir():
        return []
    listed = []
    for depth in range(1, MAX_PARTS + 1):
        for config in sorted(root.glob("/".join(["*"] * depth) + f"/{MODEL_CONFIG}")):
            model_id = config.parent.relative_to(root).as_posix()
            if _servable(root, model_id):
                listed.append(_describe(model_id, config))
    return sorted(listed, key=lambda model: model["id"])


def _servable(root: Path, model_id: str) -> bool:
    try:
        check_model_name(model_id, "model")
    except ValueError:
        return False  # hidden (staging) folders, names inference could not ask for
    parts = model_id.split("/")
    # A folder inside another model (a bundled base model, source prompts) is not a model.
    return not any(
        (root / "/".join(parts[:depth]) / MODEL_CONFIG).is_file() for depth in range(1, len(parts))
    )


def _describe(model_id: str, config: Path) -> dict:
    modified = config.stat().st_mtime
    cached = _DESCRIBED.get(config)
    if cached is None or cached[0] != modified:
        try:
            values = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            values = {}
        cached = (modified, values if isinstance(values, dict) else {})
        _DESCRIBED[config] = cached
    values = cached[1]
    base = _base_name(values)
    # A TextGeneration model is a whole model; the others are adapters of their base.
    whole = values.get("module_id") in _WHOLE_MODEL_IDS or base is None
    return {
        "id": model_id,
        "object": "model",
        "created": int(modified),
        "owned_by": OWNER,
        "root": base or model_id,
        "parent": None if whole else base,
    }


def _base_name(values: dict) -> str | None:
    base = values.get("base_model") or values.get("base_model_name")
    if isinstance(base, dict):
        base = base.get("name") or base.get("path")
    return Path(str(base)).name if base else None


def _whole_model_ids() -> tuple[str, ...]:
    from ..modules.text_generation import TextGeneration

    return (TextGeneration.MODULE_ID, TEXT_GENERATION_ID)


_WHOLE_MODEL_IDS = _whole_model_ids()


def served_model(model_id: str):
    """The loaded module for `model_id` (loading it on first use), or 404."""
    try:
        module = ModelManager.get_instance().retrieve_model(model_id)
    except CaikitRuntimeException as err:
        if err.status_code == StatusCode.NOT_FOUND:
            raise unknown_model(model_id) from None
        raise
    if not hasattr(module, "generator") or not hasattr(module, "model_input"):
        raise OpenAIError(
            400, f"The model `{model_id}` does not generate text.", "model", "model_not_supported"
        )
    return module


def unknown_model(model_id: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model_id}` does not exist; GET /v1/models lists the served models.",
        "model",
        "model_not_found",
    )
