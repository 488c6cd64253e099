"""Records -> verbalized text -> token ids -> padded batches."""

from .batching import (
    Batch,
    collate_causal,
    collate_seq2seq,
    collator_for,
    length_grouped_batches,
)
from .records import collect_records
from .tokenize import Example, build_examples, encode_sources, tokenize_examples
from .verbalizer import Verbalizer

__all__ = [
    "Batch",
    "Example",
    "build_examples",
    "Verbalizer",
    "collate_causal",
    "collate_seq2seq",
    "collator_for",
    "collect_records",
    "encode_sources",
    "length_grouped_batches",
    "tokenize_examples",
]
