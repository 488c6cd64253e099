"""What every training job runner does in its process: a worker-pool worker, or a Ray
Train worker."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path

from ..training import checkpointing
from ..training.progress import progress_sink
from ..training.tracking import run_name
from .jobs import CHECKPOINTS_FOLDER, REQUEST_FILE


def load_class(path: str) -> type:
    """`package.module:Class` -> the class."""
    module_name, _, qualname = path.partition(":")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def run_job(folder: Path, on_progress: Callable[[dict], None], save: bool = True) -> None:
    """Train the module named in FOLDER/request.pkl (progress to `on_progress`,
    resumable checkpoints in the job folder, tracked under the model name), then save
    it where the request says."""
    with open(folder / REQUEST_FILE, "rb") as handle:
        request = pickle.load(handle)  # written by this job's own server
    module_class = load_class(request["module"])
    with (
        progress_sink(on_progress),
        checkpointing(folder / CHECKPOINTS_FOLDER),
        run_name(request["model_name"]),
    ):
        model = module_class.train(**request["kwargs"])
    if save:
        model.save(request["save_path"])
