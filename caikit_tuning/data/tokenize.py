"""Records -> token ids, once per job: the source is masked out of the loss later."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """One tokenized record. `target_ids` ends with EOS so the model learns to stop.

    `source_targets` are indices into `source_ids` that are learned too (earlier
    assistant turns of a chat); normally none: the source is only context.
    """

    source_ids: list[int]
    target_ids: list[int]
    source_targets: tuple[int, ...] = ()
    # Index of the record's task (multitask prompt tuning); 0 when there is one task.
    task: int = 0

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


CHAT_LOSS = ("last_assistant", "assistant", "all")


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    render,
    max_source_length: int,
    max_target_length: int,
    chat_loss: str = "last_assistant",
) -> list[Example]:
    """Verbalize (or chat-render) and tokenize every record once, up front; records
    with a `task` field get the index of their task in `task_names(records)`."""
    if records and "messages" in records[0]:
        examples = [
            tokenize_chat(tokenizer, r["messages"], chat_loss, max_source_length, max_target_length)
            for r in records
        ]
    else:
        examples = tokenize_examples(
            tokenizer,
            [render(record) for record in records],
            [record["output"] for record in records],
            max_source_length,
            max_target_length,
        )
    index = {name: i for i, name in enumerate(task_names(records))}
    return [
        dataclasses.replace(ex, task=index[r.get("task", "")])
        for ex, r in zip(examples, records, strict=True)
    ]


def task_names(records: list[dict]) -> list[str]:
    """The distinct `task` values of the records, sorted ("" for records without one)."""
    return sorted({record.get("task", "") for record in records})


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], open_turn: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    chat_loss: str,
    max_source_length: int,
    max_target_length: int,
) -> Example:
    """A conversation through the tokenizer's chat template; the last assistant turn is
    the target, and with chat_loss "assistant" / "all" earlier assistant turns / every
    token are learned too."""
    if chat_loss not in CHAT_LOSS:
        raise ValueError(f"`chat_loss` must be one of {list(CHAT_LOSS)}, got {chat_loss!r}.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat records need a tokenizer with a chat template; this one has none.")
    source = _chat_ids(tokenizer, messages[:-1], open_turn=True)
    full = _chat_ids(tokenizer, messages, open_turn=False)
    if full[: len(source)] == source:
        target = full[len(source) :]
    else:  # the template re-tokenizes at the boundary: fall back to the answer's own text
        target = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in target:  # the turn ends at EOS; what the template adds after it is not learned
        target = target[: target.index(eos)]
    target = target[: max_target_length - 1] + [eos]
    learned: list[int] = []
    if chat_loss == "all":
        learned = list(range(1, len(source)))
    elif chat_loss == "assistant":
        for turn, message in enumerate(messages[:-1]):
            if message["role"] == "assistant":
                start = len(_chat_ids(tokenizer, messages[:turn], open_turn=True))
                end = len(_chat_ids(tokenizer, messages[: turn + 1], open_turn=False))
                learned.extend(range(max(start, 1), min(end, len(source))))
    # Keep the end of a long context, as for text records.
    cut = max(0, len(source) - max_source_length)
    return Example(
        source_ids=source[cut:],
        target_ids=target,
        source_targets=tuple(i - cut for i in learned if i - cut >= 1),
    )
