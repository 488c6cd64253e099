"""A training job's records: read once, checked, mixed from files, split for validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .files import mix_records
from .records import check_fields, collect_records, is_chat
from .verbalizer import Verbalizer


@dataclass(frozen=True)
class RecordPlan:
    """How a job reads its records (made from its training plan)."""

    verbalizer: Verbalizer
    is_encoder_decoder: bool
    # Training files mixed instead of a train_stream: ((file, weight), ...).
    mixture: tuple = ()
    mixture_mode: str = "concatenate"
    mixture_size: int | None = None
    mixture_seed: int = 0
    # Without a val_stream: this share of the training records, chosen with split_seed.
    split_ratio: float = 0.0
    split_seed: int = 0
    # The library's cap on records per job (max_training_records; 0: none).
    max_records: int = 0
    # caikit-nlp's training_data_limit for this module and base model (0: none), and
    # what it applies to, for the message.
    limit: int = 0
    limit_scope: str = ""


def read_records(
    train_stream: Any, val_stream: Any, plan: RecordPlan
) -> tuple[list[dict], list[dict]]:
    """Training and validation records; without a val_stream, split_ratio of the
    training records become the validation set."""
    if plan.mixture:
        if train_stream is not None:
            raise ValueError("give `train_stream` or `data.mixture`, not both.")
        try:
            train_stream = mix_records(
                plan.mixture, plan.mixture_mode, plan.mixture_size, plan.mixture_seed
            )
        except ValueError as err:
            raise ValueError(f"`data.mixture`: {err}") from err
    records = collect_records(train_stream, "train_stream", plan.max_records)
    if plan.limit > 0 and len(records) > plan.limit:
        raise ValueError(
            f"`train_stream` has {len(records)} records; training_data_limit allows at most "
            f"{plan.limit} for {plan.limit_scope}. Use fewer records or raise the limit in "
            "the config."
        )
    val_records = collect_records(val_stream, "val_stream", required=False)
    for name, rows in (("train_stream", records), ("val_stream", val_records)):
        if rows and is_chat(rows[0]):
            if plan.is_encoder_decoder:
                raise ValueError(f"`{name}` holds chat records, which need a causal LM.")
            if plan.verbalizer.template != "{{input}}":
                raise ValueError(
                    f"`{name}` holds chat records, rendered by the chat template: leave "
                    "`verbalizer` unset."
                )
        check_fields(rows, plan.verbalizer.fields, name)
    if plan.split_ratio and not val_records:
        records, val_records = _split(records, plan.split_ratio, plan.split_seed)
    return records, val_records


def _split(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    count = int(len(records) * ratio)
    if count < 1 or count >= len(records):
        raise ValueError(
            f"`validation.split_ratio` {ratio} of {len(records)} records leaves no "
            "validation or no training records; use more records or another ratio."
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
    held_out = set(order[:count].tolist())
    return (
        [r for i, r in enumerate(records) if i not in held_out],
        [r for i, r in enumerate(records) if i in held_out],
    )


def trained_on_chat(records: list[dict]) -> bool:
    return bool(records) and is_chat(records[0])
