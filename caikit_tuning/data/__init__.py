"""Records -> verbalized text -> token ids -> padded batches."""

from .batching import (
    Batch,
    collate_causal,
    collate_packed,
    collate_seq2seq,
    collator_for,
    length_grouped_batches,
)
from .files import read_records_file
from .reading import RecordPlan, read_records, trained_on_chat
from .records import check_fields, collect_records, is_chat
from .tokenize import Example, build_examples, encode_sources, task_names, tokenize_examples
from .verbalizer import Verbalizer

__all__ = [
    "Batch",
    "RecordPlan",
    "read_records",
    "trained_on_chat",
    "Example",
    "build_examples",
    "Verbalizer",
    "collate_causal",
    "collate_packed",
    "collate_seq2seq",
    "collator_for",
    "check_fields",
    "collect_records",
    "is_chat",
    "read_records_file",
    "task_names",
    "encode_sources",
    "length_grouped_batches",
    "tokenize_examples",
]
