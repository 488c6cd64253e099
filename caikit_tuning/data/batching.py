"""Micro-batches: packed into one row without padding (causal LMs), or padded per batch
(never to a fixed size), optionally of similar lengths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenize import Example

# Examples are sorted by length inside windows of this many batches, so batches hold
# similar lengths while the data order stays random across windows.
_GROUP_BATCHES = 32


def length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, group_by_length: bool = True
) -> list[list[int]]:
    """Indices of one epoch, shuffled, cut into batches of similar lengths.

    Within a window of `_GROUP_BATCHES` batches the examples are sorted longest first,
    then the batch order is shuffled again so lengths do not drift through the epoch.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * _GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


@dataclass
class Batch:
    """Padded tensors of one micro-batch, still on the CPU.

    Causal LMs: `input_ids` is source + target; `target_positions[b, k]` is the position
    whose output predicts `target_ids[b, k]` (padded with position 0 and id -100).
    Seq2seq: `input_ids` is the source, `decoder_input_ids` the shifted target and
    `target_ids` the target itself.
    """

    input_ids: torch.Tensor  # (batch, seq_len)
    attention_mask: torch.Tensor  # (batch, seq_len)
    target_ids: torch.Tensor  # (batch, n_targets)
    target_positions: torch.Tensor | None = None  # (batch, n_targets), causal only
    decoder_input_ids: torch.Tensor | None = None  # (batch, n_targets), seq2seq only
    decoder_attention_mask: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None  # (batch,) or, packed, (segments,)
    # Packed (causal LMs): every example of the micro-batch in one row, no padding;
    # `segment_lengths` are their lengths and `target_segments` says whose target is
    # whose (the loss puts each example's own soft prompt before it).
    segment_lengths: list[int] | None = None
    target_segments: torch.Tensor | None = None  # (1, n_targets)
    num_target_tokens: int = 0
    num_real_tokens: int = 0
    num_padded_tokens: int = 0

    def to(self, device: torch.device) -> Batch:
        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return Batch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            target_ids=move(self.target_ids),
            target_positions=move(self.target_positions),
            decoder_input_ids=move(self.decoder_input_ids),
            decoder_attention_mask=move(self.decoder_attention_mask),
            task_ids=move(self.task_ids),
            segment_lengths=self.segment_lengths,
            target_segments=move(self.target_segments),
            num_target_tokens=self.num_target_tokens,
            num_real_tokens=self.num_real_tokens,
            num_padded_tokens=self.num_padded_tokens,
        )


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return _pad([[1] * len(row) for row in rows], 0)


def collate_causal(examples: list[Example], pad_id: int) -> Batch:
    rows = [ex.source_ids + ex.target_ids for ex in examples]
    # Output at position p predicts token p + 1: the targets start after the source;
    # learned source tokens (chat turns) come first.
    positions = [
        [i - 1 for i in ex.source_targets]
        + list(range(len(ex.source_ids) - 1, len(ex.source_ids) - 1 + len(ex.target_ids)))
        for ex in examples
    ]
    targets = [[ex.source_ids[i] for i in ex.source_targets] + ex.target_ids for ex in examples]
    input_ids = _pad(rows, pad_id)
    real = sum(len(row) for row in rows)
    return Batch(
        input_ids=input_ids,
        attention_mask=_mask(rows),
        target_ids=_pad(targets, -100),
        target_positions=_pad(positions, 0),
        task_ids=torch.tensor([ex.task for ex in examples]),
        num_target_tokens=sum(len(t) for t in targets),
        num_real_tokens=real,
        num_padded_tokens=input_ids.numel() - real,
    )


def collate_packed(examples: list[Example]) -> Batch:
    """All examples in one row, back to back: no padding at all. Attention stays within
    each example (the model sees position ids restart at every example)."""
    rows = [ex.source_ids + ex.target_ids for ex in examples]
    positions, targets, segments, offset = [], [], [], 0
    for index, ex in enumerate(examples):
        own = [i - 1 for i in ex.source_targets] + list(
            range(len(ex.source_ids) - 1, len(ex.source_ids) - 1 + len(ex.target_ids))
        )
        positions += [offset + p for p in own]
        targets += [ex.source_ids[i] for i in ex.source_targets] + ex.target_ids
        segments += [index] * len(own)
        offset += len(rows[index])
    return Batch(
        input_ids=torch.tensor([[token for row in rows for token in row]]),  # (1, total)
        attention_mask=torch.ones(1, offset, dtype=torch.long),
        target_ids=torch.tensor([targets]),
        target_positions=torch.tensor([positions]),
        task_ids=torch.tensor([ex.task for ex in examples]),
        segment_lengths=[len(row) for row in rows],
        target_segments=torch.tensor([segments]),
        num_target_tokens=len(targets),
        num_real_tokens=offset,
        num_padded_tokens=0,
    )


def collate_seq2seq(examples: list[Example], pad_id: int, decoder_start_id: int) -> Batch:
    if any(ex.source_targets for ex in examples):
        raise ValueError("learning source tokens (chat turns) needs a causal LM.")
    sources = [ex.source_ids for ex in examples]
    decoder_rows = [[decoder_start_id] + ex.target_ids[:-1] for ex in examples]
    input_ids = _pad(sources, pad_id)
    decoder_input_ids = _pad(decoder_rows, pad_id)
    real = sum(len(ex) for ex in examples)
    return Batch(
        input_ids=input_ids,
        attention_mask=_mask(sources),
        target_ids=_pad([ex.target_ids for ex in examples], -100),
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=_mask(decoder_rows),
        task_ids=torch.tensor([ex.task for ex in examples]),
        num_target_tokens=sum(len(ex.target_ids) for ex in examples),
        num_real_tokens=real,
        num_padded_tokens=input_ids.numel() + decoder_input_ids.numel() - real,
    )


def collator_for(
    is_encoder_decoder: bool, pad_id: int, decoder_start_id: int | None, packing: bool = False
):
    """The collate function for a model kind: causal LMs pack or pad, seq2seq pads."""
    if not is_encoder_decoder:
        if packing:
            return collate_packed
        return lambda examples: collate_causal(examples, pad_id)
    if decoder_start_id is None:
        raise ValueError("the encoder-decoder model's config has no decoder_start_token_id.")
    return lambda examples: collate_seq2seq(examples, pad_id, decoder_start_id)
