"""Training records from a caikit DataStream (or any iterable), checked once at the boundary.

Two shapes are accepted:
- text records: `output` plus the fields the verbalizer names (`input` by default,
  or any columns: "Context: {{context}} Question: {{question}}");
- chat records: `{"messages": [{"role": ..., "content": ...}, ...]}` ending with an
  assistant turn, rendered with the tokenizer's chat template.
caikit's ClassificationTrainRecord (`text`, `labels`) reads as a text record with
input = text and output = the labels joined by ",", as caikit-nlp reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from caikit.interfaces.nlp.data_model import ClassificationTrainRecord

CHAT_ROLES = ("system", "user", "assistant", "tool")


def _as_mapping(record: Any) -> dict[str, Any]:
    if isinstance(record, ClassificationTrainRecord):
        return {"input": record.text, "output": ",".join(record.labels or [])}
    if isinstance(record, dict):
        return record
    if hasattr(record, "to_dict"):
        return record.to_dict()
    raise TypeError(
        f"training records must be TrainGenerationRecord objects or dicts, got {type(record).__name__}."
    )


def is_chat(record: dict) -> bool:
    return "messages" in record


def _check_chat(record: dict, field: str, index: int) -> dict:
    messages = record["messages"]
    where = f"`{field}` record {index}"
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: `messages` must be a non-empty list of {{role, content}} turns."
        )
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {turn} needs a string `content`.")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(
                f"{where}: message {turn} has role {message.get('role')!r}; valid: {list(CHAT_ROLES)}."
            )
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer to learn.")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _check_text(record: dict, field: str, index: int) -> dict:
    if not isinstance(record.get("output"), str):
        raise ValueError(
            f"`{field}` record {index} has no string `output` (got {record.get('output')!r}); "
            "every record needs the `output` text to learn."
        )
    return {key: value for key, value in record.items() if isinstance(value, str)}


def collect_records(
    stream: Iterable[Any] | None,
    field: str = "train_stream",
    max_records: int = 0,
    required: bool = True,
) -> list[dict]:
    """Read every record of `stream` into memory, checking its shape.

    A malformed record is an error naming its position; nothing is skipped silently.
    Which text fields a record needs depends on the verbalizer (see `check_fields`).
    """
    if stream is None:
        if required:
            raise ValueError(
                f"`{field}` is required: give training records with `input` and `output`."
            )
        return []
    records: list[dict] = []
    for index, raw in enumerate(stream):
        record = _as_mapping(raw)
        check = _check_chat if is_chat(record) else _check_text
        records.append(check(record, field, index))
        if max_records and len(records) > max_records:
            raise ValueError(
                f"`{field}` has more than {max_records} records, the configured "
                "`max_training_records`; use fewer records or raise the cap."
            )
    if required and not records:
        raise ValueError(f"`{field}` is empty; give at least one training record.")
    if len({is_chat(r) for r in records}) > 1:
        raise ValueError(
            f"`{field}` mixes chat records (`messages`) and text records; use one kind."
        )
    return records


def check_fields(records: list[dict], fields: tuple[str, ...], field: str = "train_stream") -> None:
    """Every text record has every field the verbalizer names."""
    for index, record in enumerate(records):
        if is_chat(record):
            return
        missing = [name for name in fields if not isinstance(record.get(name), str)]
        if missing:
            raise ValueError(
                f"`{field}` record {index} has no {', '.join(f'`{m}`' for m in missing)}, which the "
                f"verbalizer names; its fields are {sorted(record)}."
            )
