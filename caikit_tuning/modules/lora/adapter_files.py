"""Weight adapters on disk: standard PEFT folders, where they may be read from, and how
they are written and attached to a base model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ...config import library_settings
from ...generation.adapters import AdaptedLinear, AdapterWeights, LayerAdapter, lora_scaling
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


# The adapter types a shared base model serves (generation/adapters.py); AdaLoRA
# adapters keep a base model of their own.
SHAREABLE = ("LORA", "IA3")
_PEFT_PREFIX = "base_model.model."


def shareable(config: PeftConfig) -> bool:
    """Whether a saved adapter can be served on a shared base model: LoRA (rsLoRA, DoRA)
    or IA3 on linear layers, with one rank and alpha for every layer, no trained biases
    and no whole modules of its own."""
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    return (
        kind in SHAREABLE
        and not getattr(config, "rank_pattern", None)
        and not getattr(config, "alpha_pattern", None)
        and not getattr(config, "modules_to_save", None)
        and getattr(config, "bias", "none") == "none"
        and not getattr(config, "fan_in_fan_out", False)
    )


def adapter_reader(
    folder: Path, model: PreTrainedModel, config: PeftConfig
) -> Callable[[], AdapterWeights]:
    """Reads the saved adapter's tensors each time a shared base model attaches it.
    Fails, rather than read other weights, when the file changed since the model loaded
    (a retrained model saved over it is served by its own, newly loaded model)."""
    path = folder / SAFETENSORS_WEIGHTS_NAME
    identity = _identity(path)

    def read() -> AdapterWeights:
        if _identity(path) != identity:
            raise RuntimeError(
                f"the adapter file of model {folder.parent.name} changed after it was loaded; "
                "load the model again to serve its new weights."
            )
        return read_adapter_weights(folder, model, config)

    read()  # fails now, with the reason, when it does not fit the model
    return read


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read_adapter_weights(
    folder: Path, model: PreTrainedModel, config: PeftConfig
) -> AdapterWeights:
    """The saved adapter's tensors per target layer of `model`, to attach to a shared
    base model (read from disk each time it is attached)."""
    tensors = load_file(str(folder / SAFETENSORS_WEIGHTS_NAME))
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l"):
            if name.endswith(suffix):
                by_module.setdefault(name.removesuffix(suffix), {})[suffix] = tensor
                break
        else:
            raise ValueError(f"the adapter in {folder.name} holds an unexpected tensor {key!r}.")
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    layers = {}
    for module, parts in by_module.items():
        try:
            target = model.get_submodule(module)
        except AttributeError as err:
            raise ValueError(
                f"the adapter in {folder.name} targets {module}, which the base model lacks."
            ) from err
        if not isinstance(target, (torch.nn.Linear, AdaptedLinear)):
            raise ValueError(f"the adapter in {folder.name} targets {module}, not a linear layer.")
        weight = target.weight
        device = weight.device
        if kind == "IA3":
            feedforward = any(module.endswith(f) for f in (config.feedforward_modules or ()))
            layers[module] = LayerAdapter(
                ia3=parts[".ia3_l"].to(device).flatten(), ia3_feedforward=feedforward
            )
            continue
        lora_a, lora_b = parts[".lora_A.weight"].to(device), parts[".lora_B.weight"].to(device)
        if lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0]:
            raise ValueError(
                f"the adapter in {folder.name} does not fit the base model at {module}: "
                f"{tuple(lora_b.shape)} x {tuple(lora_a.shape)} against {tuple(weight.shape)}."
            )
        magnitude = parts.get(".lora_magnitude_vector")
        layers[module] = LayerAdapter(
            lora_a=lora_a,
            lora_b=lora_b,
            scaling=lora_scaling(config.lora_alpha, config.r, bool(config.use_rslora)),
            magnitude=magnitude.to(device) if magnitude is not None else None,
        )
    return AdapterWeights(layers)
