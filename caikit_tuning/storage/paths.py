"""Path policy: every user-given name or path is checked against the folder it may name."""

import re
from pathlib import Path

# A hub-style model id: "name" or "org/name", no dots-only parts.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_under(root: str | Path, name: str, field: str) -> Path:
    """Return `root/name`, refusing anything that would land outside `root`.

    `name` may contain sub-folders ("team/model") but no absolute path, no ".."
    and no symlink that leaves `root`. Messages name `root` by its role, never by its
    path: they go back to remote callers.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`{field}` must be a non-empty name, got {name!r}.")
    if "\x00" in name or name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(
            f"`{field}` must be a name relative to its configured folder, got {name!r}: "
            "absolute paths are not allowed here."
        )
    parts = re.split(r"[\\/]", name)
    if any(part in ("..", ".", "") for part in parts):
        raise ValueError(f"`{field}` must not contain '..', '.' or empty path parts, got {name!r}.")
    root_path = Path(root).resolve()
    candidate = (root_path / name).resolve()
    if not candidate.is_relative_to(root_path):
        raise ValueError(
            f"`{field}` {name!r} resolves outside its configured folder and is refused."
        )
    return candidate


def is_hub_id(name: str) -> bool:
    """True when `name` has the shape of a Hugging Face hub model id."""
    return bool(_HUB_ID.match(name)) and ".." not in name
