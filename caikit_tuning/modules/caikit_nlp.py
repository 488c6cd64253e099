"""Folders saved by caikit-nlp 0.5.x load and serve here, found by caikit-nlp's module ids.

`caikit.load` (and the runtime's lazy loading) picks a module class by the `module_id`
in a folder's config.yml. The two loaders below carry caikit-nlp's ids for its
PeftPromptTuning and TextGeneration modules. They have no tasks, so they add no APIs:
each reads caikit-nlp's layout and returns this library's own module, which then
serves the model like any other.

caikit-nlp's prompt folders hold the prompt vectors (`decoder.pt` / `encoder.pt`, a
bare tensor, read with `torch.load(weights_only=True)`: tensors only, no code) and name
the base model by its folder name (`base_model_name`), looked up under
base_models_dir; the absolute training-time path some of them also record is never
followed. Its TextGeneration folders hold a whole Hugging Face model in `artifacts/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from caikit.core import ModuleBase, module
from caikit.core.modules import ModuleLoader

# caikit-nlp 0.5.x module ids.
PEFT_PROMPT_TUNING_ID = "6655831b-960a-4dc5-8df4-867026e2cd41"
TEXT_GENERATION_ID = "f9181353-4ccf-4572-bd1e-f12bcda26792"


def forget_caikit_nlp_config(model: ModuleBase) -> None:
    """caikit.load copies a folder's config.yml into the loaded module's metadata, and
    ModuleSaver writes that metadata back: a model read from a caikit-nlp folder must
    not save caikit-nlp's module id and keys into this library's layout."""
    if "caikit_nlp_version" in model.metadata:
        model.metadata.clear()


def named_file(folder: Path, name: Any, key: str) -> Path:
    """`folder/name` for a file a model's config.yml names, never outside `folder`."""
    return _inside(folder, name, key, Path.is_file, "file")


def named_folder(folder: Path, name: Any, key: str) -> Path:
    """`folder/name` for a sub-folder a model's config.yml names, never outside `folder`."""
    return _inside(folder, name, key, Path.is_dir, "folder")


def _inside(folder: Path, name: Any, key: str, exists, kind: str) -> Path:
    path = (folder / str(name)).resolve()
    if not path.is_relative_to(folder.resolve()) or not exists(path):
        raise ValueError(
            f"the model's config.yml names {key} {name!r}, which is not a {kind} inside the "
            "model folder."
        )
    return path


def read_prompt_vectors(path: Path) -> torch.Tensor:
    """A caikit-nlp / TGIS prompt file: one (num_virtual_tokens, hidden) tensor."""
    try:
        vectors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the same refusal)
        raise ValueError(f"{path.name} is not a tensor file torch can read safely: {err}") from None
    if (
        not isinstance(vectors, torch.Tensor)
        or vectors.dim() != 2
        or not vectors.is_floating_point()
    ):
        raise ValueError(
            f"{path.name} must hold one (num_virtual_tokens, hidden) float tensor, got "
            f"{type(vectors).__name__} {getattr(vectors, 'shape', '')}."
        )
    return vectors.detach().float()


@module(
    id=PEFT_PROMPT_TUNING_ID,
    name="caikit-nlp prompt model (read by caikit_tuning)",
    version="0.5.15",
)
class CaikitNlpPromptModel(ModuleBase):
    """Reads a prompt model saved by caikit-nlp's PeftPromptTuning (prompt or multitask
    prompt tuning; causal LM or seq2seq; with or without `save_base_model`)."""

    @classmethod
    def load(cls, model_path, device: Optional[str] = None, torch_dtype: Optional[str] = None):
        from .prompt_tuning import PeftPromptTuning

        loader = ModuleLoader(model_path)
        return PeftPromptTuning.from_caikit_nlp(
            Path(loader.model_path), loader.config, device, torch_dtype
        )


@module(
    id=TEXT_GENERATION_ID,
    name="caikit-nlp text generation model (read by caikit_tuning)",
    version="0.5.15",
)
class CaikitNlpTextGenerationModel(ModuleBase):
    """Reads a model saved by caikit-nlp's TextGeneration (bootstrapped or trained)."""

    @classmethod
    def load(cls, model_path, device: Optional[str] = None, torch_dtype: Optional[str] = None):
        from .text_generation import TextGeneration

        loader = ModuleLoader(model_path)
        return TextGeneration.from_caikit_nlp(
            Path(loader.model_path), loader.config, device, torch_dtype
        )
