"""Record files: JSON arrays, JSONL and CSV, read whole, with errors naming file and line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

FORMATS = (".json", ".jsonl", ".csv")


def read_records_file(path: str | Path) -> list[dict]:
    """Every record of a .json (array of objects), .jsonl or .csv (with a header) file.

    A malformed line is an error naming the file and the line; nothing is skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{path.name}: unsupported file type {suffix!r}; use one of {list(FORMATS)}."
        )
    if not path.is_file():
        raise ValueError(f"{path.name}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path.name} line {line}: not valid UTF-8 ({err.reason}).") from err
    reader = {".json": _json, ".jsonl": _jsonl, ".csv": _csv}[suffix]
    return reader(path.name, text)


def _object(name: str, line: int, value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} line {line}: expected a JSON object, got {type(value).__name__}.")
    return value


def _json(name: str, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} line {err.lineno}: invalid JSON ({err.msg}).") from err
    if not isinstance(data, list):
        raise ValueError(f"{name} line 1: expected a JSON array of records.")
    # Positions in an array have no line numbers once parsed; count records instead.
    return [_object(name, index + 1, item) for index, item in enumerate(data)]


def _jsonl(name: str, text: str) -> list[dict]:
    records = []
    # Records end at "\n" only: str.splitlines would also split inside strings at
    # U+0085, U+2028 and the like, which real review text contains.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_object(name, number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} line {number}: invalid JSON ({err.msg}).") from err
    return records


def _csv(name: str, text: str) -> list[dict]:
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if not header:
        raise ValueError(f"{name} line 1: missing the header row (e.g. input,output).")
    records = []
    for row in rows:
        number = rows.line_num  # the physical line a (possibly multi-line) row ends on
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{name} line {number}: {len(row)} columns, but the header has {len(header)}."
            )
        records.append(dict(zip(header, row, strict=True)))
    return records


def resolve_data_path(name: str) -> Path:
    """A training file a request names: inside `data_streams.file_source_base` when that
    is configured (the runtime's case), else any path (in-process)."""
    from ..config import library_settings
    from ..storage.paths import resolve_under

    root = library_settings().file_source_base
    if root:
        return resolve_under(root, name, "data.mixture.file")
    return Path(name).expanduser()


def mix_records(
    sources: tuple[tuple[str, float], ...], mode: str, size: int | None, seed: int
) -> list[dict]:
    """Records of several files: all of them in order (concatenate), or `size` records
    drawn per file in proportion to its weight (sample; with replacement only where a
    file is smaller than its share), shuffled with `seed`."""
    import torch

    tables = [read_records_file(resolve_data_path(file)) for file, _ in sources]
    if mode == "concatenate":
        return [record for table in tables for record in table]
    generator = torch.Generator().manual_seed(seed)
    total = size or sum(len(t) for t in tables)
    weights = [w for _, w in sources]
    quotas = [round(total * w / sum(weights)) for w in weights]
    mixed = []
    for table, quota in zip(tables, quotas, strict=True):
        if not table or not quota:
            continue
        if quota <= len(table):
            picks = torch.randperm(len(table), generator=generator)[:quota]
        else:
            picks = torch.randint(len(table), (quota,), generator=generator)
        mixed.extend(table[i] for i in picks.tolist())
    order = torch.randperm(len(mixed), generator=generator).tolist()
    return [mixed[i] for i in order]
