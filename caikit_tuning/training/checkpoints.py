"""Resumable checkpoints: a run killed mid-way continues where its last checkpoint left it.

A checkpoint holds the trained tensors, the optimizer and schedule, the position in the
data (epoch, step within it, and the batch-order generator's state at the epoch's
start), the RNG state, the logs so far and the best-so-far validation state. It is
written atomically and read with `weights_only=True`. A checkpoint from a different
run (settings or data) is not resumed from.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"

_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "checkpoint_folder", default=None
)


@contextlib.contextmanager
def checkpointing(folder: str | os.PathLike) -> Iterator[None]:
    """Within this block, training with checkpoint_steps saves (and resumes) here."""
    token = _FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def checkpoint_folder() -> Path | None:
    return _FOLDER.get()


def fingerprint(settings: Any, examples: list) -> str:
    """Identifies a run: its settings and its data."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(
            json.dumps([example.source_ids, example.target_ids, example.source_targets]).encode()
        )
    return digest.hexdigest()


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint:
        return None
    return state
