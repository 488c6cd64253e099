"""Records -> token ids, once per job: the source is masked out of the loss later."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One tokenized record. `target_ids` ends with EOS so the model learns to stop."""

    source_ids: list[int]
    target_ids: list[int]

    def __len__(self) -> int:
        return len(self.source_ids) + len(self.target_ids)


def encode_sources(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None
) -> list[list[int]]:
    """Token ids of prompts, with the tokenizer's special tokens.

    Long prompts lose their beginning, not their end: the end of a verbalized prompt
    ("... Sentiment:") is what cues the answer. Special tokens are kept.
    """
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    if max_length is None:
        return ids
    return [_truncate_left(row, max_length, tokenizer) for row in ids]


def _truncate_left(
    ids: list[int], max_length: int, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    if len(ids) <= max_length:
        return ids
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and ids and ids[0] == bos
    if keep_bos:
        return [bos] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    targets: list[str],
    max_source_length: int,
    max_target_length: int,
) -> list[Example]:
    if not sources:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; the model could not learn to stop.")
    source_ids = encode_sources(tokenizer, sources, max_source_length)
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [
        Example(source_ids=src, target_ids=tgt[: max_target_length - 1] + [eos])
        for src, tgt in zip(source_ids, target_ids, strict=True)
    ]


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    render,
    max_source_length: int,
    max_target_length: int,
) -> list[Example]:
    """Verbalize and tokenize every record once, up front."""
    return tokenize_examples(
        tokenizer,
        [render(record) for record in records],
        [record["output"] for record in records],
        max_source_length,
        max_target_length,
    )
