"""Training records from a caikit DataStream (or any iterable), checked once at the boundary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _as_mapping(record: Any) -> dict[str, Any]:
    if isinstance(record, dict):
        return record
    if hasattr(record, "to_dict"):
        return record.to_dict()
    if hasattr(record, "input") and hasattr(record, "output"):
        return {"input": record.input, "output": record.output}
    raise TypeError(
        f"training records must be TrainGenerationRecord objects or dicts with `input` and "
        f"`output`, got {type(record).__name__}."
    )


def collect_records(
    stream: Iterable[Any] | None,
    field: str = "train_stream",
    max_records: int = 0,
    required: bool = True,
) -> list[dict[str, str]]:
    """Read every record of `stream` into memory as {"input": ..., "output": ...} dicts.

    A record without a string `input` and `output` is an error naming its position;
    nothing is skipped silently.
    """
    if stream is None:
        if required:
            raise ValueError(
                f"`{field}` is required: give training records with `input` and `output`."
            )
        return []
    records: list[dict[str, str]] = []
    for index, raw in enumerate(stream):
        record = _as_mapping(raw)
        for key in ("input", "output"):
            value = record.get(key)
            if not isinstance(value, str):
                raise ValueError(
                    f"`{field}` record {index} has no string `{key}` (got {value!r}); every "
                    "record needs `input` and `output` text."
                )
        records.append({key: value for key, value in record.items() if isinstance(value, str)})
        if max_records and len(records) > max_records:
            raise ValueError(
                f"`{field}` has more than {max_records} records, the configured "
                "`max_training_records`; use fewer records or raise the cap."
            )
    if required and not records:
        raise ValueError(f"`{field}` is empty; give at least one training record.")
    return records
