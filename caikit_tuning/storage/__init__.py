"""Folders on disk: names that stay inside the folder they may name, and model folders
that appear complete or not at all."""

from .folders import MODEL_CONFIG, atomic_folder, read_jsonl, write_jsonl
from .paths import is_hub_id, resolve_under

__all__ = [
    "MODEL_CONFIG",
    "atomic_folder",
    "is_hub_id",
    "read_jsonl",
    "resolve_under",
    "write_jsonl",
]
