"""Model folders that appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

# Staging folders start with a dot so model pollers that skip hidden entries ignore them.
STAGING_PREFIX = ".staging-"
# caikit writes this into every saved model folder.
MODEL_CONFIG = "config.yml"


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, marker: str = MODEL_CONFIG) -> Iterator[Path]:
    """Yield an empty staging folder next to `path`; on success it becomes `path`.

    If the block raises, the staging folder is removed and `path` is left as it was.
    An existing `path` is replaced only once the new folder is complete, and only if
    it is empty or holds `marker` (a saved caikit model has config.yml): a folder
    holding anything else (other models) is never replaced.
    """
    target = Path(path).expanduser().resolve()
    if target.is_dir() and not (target / marker).is_file() and any(target.iterdir()):
        raise FileExistsError(
            f"{target.name!r} is a folder that holds other files or models, not a saved "
            "model; saving there would replace them. Choose another name."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = target.parent / f"{STAGING_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
