"""Weight adapters on disk: standard PEFT folders, where they may be read from, and how
they are written and attached to a base model."""

from __future__ import annotations

from pathlib import Path

from peft import PeftConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from transformers import PreTrainedModel

from ...config import library_settings
from ...storage import resolve_under

# Inside a saved LoraTuning model, the PEFT adapter lives in this sub-folder.
ADAPTER_FOLDER = "adapter"


def inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused when it (or a symlink in it) leaves `folder`."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"the model at {folder} names {what} outside its folder: {relative!r}.")
    return path


def locate_adapter(value: object, field: str) -> Path:
    """The PEFT adapter folder a request names: a name under base_models_dir or, when
    `restrict_base_models_to_dir` is off (in-process), a folder path, as for base models.
    A saved LoraTuning model may be named too: its adapter sub-folder is used."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{field}` must name a saved adapter folder, got {value!r}.")
    restricted = library_settings().restrict_base_models_to_dir
    if not restricted and Path(value).expanduser().is_dir():
        folder = Path(value).expanduser().resolve()
    else:
        folder = resolve_under(library_settings().base_models_dir, value, field)
    if not (folder / CONFIG_NAME).is_file() and (folder / ADAPTER_FOLDER).is_dir():
        folder = inside(folder, ADAPTER_FOLDER, "its adapter")
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"`{field}` {value!r} is not an adapter: {folder} has no {CONFIG_NAME}. Name a "
            "folder written by LoraTuning.save or PeftModel.save_pretrained (under "
            "base_models_dir)."
        )
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"`{field}` {value!r} has no {SAFETENSORS_WEIGHTS_NAME} in {folder}: only "
            "safetensors adapters are loaded (pickled .bin weights can run code). Re-save it "
            "with save_pretrained(..., safe_serialization=True)."
        )
    return folder


def read_adapter_config(folder: Path, field: str) -> PeftConfig:
    try:
        return PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"`{field}`: {folder / CONFIG_NAME} is not a valid PEFT config: {err}"
        ) from err


def save_adapter(peft_model: PeftModel, folder: Path, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors, recording the base model by its
    name (or folder) rather than the local path it happened to load from."""
    config = peft_model.peft_config[peft_model.active_adapter]
    loaded_from = config.base_model_name_or_path
    config.base_model_name_or_path = base_model
    try:
        # The embeddings are never resized here, so there is nothing to save of them;
        # "auto" would look the base model's name up on the hub to find out.
        peft_model.save_pretrained(
            str(folder), safe_serialization=True, save_embedding_layers=False
        )
    finally:
        config.base_model_name_or_path = loaded_from


def load_adapter(
    model: PreTrainedModel, folder: Path, trainable: bool, what: str
) -> tuple[PeftModel, PeftConfig]:
    """Attach the adapter saved in `folder` to `model` (its layers are wrapped in place)."""
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ValueError(f"{what} has no {SAFETENSORS_WEIGHTS_NAME} in {folder}.")
    config = read_adapter_config(folder, what)
    try:
        peft_model = PeftModel.from_pretrained(
            model, str(folder), is_trainable=trainable, config=config
        )
    except (RuntimeError, ValueError, KeyError) as err:
        # Shape mismatches (another base model) surface as RuntimeError from torch.
        raise ValueError(
            f"{what} at {folder} does not fit base model {model.config.model_type!r} "
            f"({model.name_or_path}): {err}"
        ) from err
    return peft_model, config
