"""The one rule for model names: what a training job may be called is what inference
may ask for, and no model's folder may hold, replace or hide another model.

A name is one to three parts joined by "/" ("sentiment", "team/sentiment"), each part
ASCII letters, digits, ".", "_" or "-", starting with a letter or digit, at most 100
characters; 200 in all. So every name is a valid folder name (with room for the
staging folder a save writes first), can travel in gRPC metadata (ASCII only), and
can never be hidden (".x") or climb out of its folder ("..").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..storage.folders import MODEL_CONFIG

MAX_PARTS = 3
MAX_PART_CHARS = 100
MAX_CHARS = 200
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_model_name(name: object, field: str) -> str:
    """`name` if it follows the rule, else ValueError naming `field` and the rule."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`{field}` must be a non-empty name, got {_shown(name)}.")
    rule = (
        f"{MAX_PARTS} or fewer parts joined by '/', each of ASCII letters, digits, '.', '_' "
        f"or '-' starting with a letter or digit, at most {MAX_PART_CHARS} characters "
        f"({MAX_CHARS} in all)"
    )
    parts = name.split("/")
    if (
        len(name) > MAX_CHARS
        or len(parts) > MAX_PARTS
        or any(len(part) > MAX_PART_CHARS or not _PART.fullmatch(part) for part in parts)
    ):
        raise ValueError(f"`{field}` {_shown(name)} is not a valid model name: use {rule}.")
    return name


def check_no_overlap(root: Path, name: str, pending: Iterable[str] = ()) -> None:
    """Training `name` into `root` must not replace a folder of other models, land
    inside another model's folder, or nest with a model another job is writing."""
    target = root / name
    parts = name.split("/")
    for depth in range(1, len(parts)):
        ancestor = "/".join(parts[:depth])
        if (root / ancestor / MODEL_CONFIG).is_file():
            raise ValueError(
                f"`model_name` {name!r} would be saved inside the model {ancestor!r}; "
                "choose a name outside it."
            )
    if target.is_dir() and not (target / MODEL_CONFIG).is_file() and any(target.iterdir()):
        inside = sorted(p.relative_to(root).as_posix() for p in target.iterdir())[:3]
        raise ValueError(
            f"`model_name` {name!r} is a folder holding other models ({', '.join(inside)}); "
            "training it would replace them. Choose another name."
        )
    for other in pending:
        if other != name and (other.startswith(f"{name}/") or name.startswith(f"{other}/")):
            raise ValueError(
                f"`model_name` {name!r} nests with {other!r}, which a queued or running "
                "training job is writing; choose a name that does not contain it or sit inside it."
            )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} characters)"
