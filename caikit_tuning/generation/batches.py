"""The running batch of a batching engine: its rows and their shared caches.

Two kinds, one per model family; the engine (batching.py) only admits requests and
steps:

- CausalBatch: a decoder-only model. Rows are left-padded in one KV cache; each row
  keeps its own position ids and attention mask.
- Seq2SeqBatch: an encoder-decoder model with relative positions (T5). Each admitted
  request's encoder runs once; its outputs (and the decoder's cross-attention keys and
  values) are right-padded to the longest input, the decoder's self-attention cache is
  left-padded, both masked, so every row attends exactly to its own tokens.

Both give each row its own soft prompt (at prefill), its own weight adapter (routed on
every forward pass, generation/adapters.py) and its own decoder (sampling, stops). A row
that fails alone ends alone: its error goes to its request, the batch goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from ..inputs.prefix import PromptPrefix, accepts_logits_to_keep, embed_with_prefix
from .adapters import routed


@dataclass
class Row:
    """A request inside the running batch."""

    request: object  # batching._Request
    position: int  # position id of the next token (causal models)
    last_token: int


# How a batch hands a request its next logits: returns the event (None: it failed).
Advance = Callable[[object, torch.Tensor], object]


def advance_rows(rows: list[Row], logits: torch.Tensor, advance: Advance) -> list[int]:
    """Each running row's next token, from its logits (rows, vocab); returns the indices
    of the rows that go on (neither cancelled, failed nor finished), whose last token and
    position move on."""
    keep = []
    for index, row in enumerate(rows):
        if row.request.cancelled.is_set():
            continue
        event = advance(row.request, logits[index])
        if event is not None and not row.request.decoder.finished:
            row.position += 1
            row.last_token = event.token_id
            keep.append(index)
    return keep


def _slots(requests) -> torch.Tensor | None:
    """Each row's adapter slot, or None when no row has an adapter."""
    slots = [request.slot for request in requests]
    return torch.tensor(slots) if any(slots) else None


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, length, dim) -> (rows, heads, width, dim), zeros in front."""
    missing = width - states.shape[2]
    if missing == 0:
        return states
    pad = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([pad, states], dim=2)


def _right_pad(states: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - states.shape[dim]
    if missing == 0:
        return states
    shape = list(states.shape)
    shape[dim] = missing
    return torch.cat([states, states.new_zeros(shape)], dim=dim)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def _pack(pieces: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(length_i, hidden) pieces -> padded (n, width, hidden) and its (n, width) mask."""
    width = max(piece.shape[0] for piece in pieces)
    embeds = pieces[0].new_zeros(len(pieces), width, pieces[0].shape[1])
    mask = torch.zeros(len(pieces), width, dtype=torch.long, device=pieces[0].device)
    for index, piece in enumerate(pieces):
        span = slice(width - piece.shape[0], width) if left else slice(0, piece.shape[0])
        embeds[index, span] = piece
        mask[index, span] = 1
    return embeds, mask


# A prefill group may hold at most this share of padding: longer inputs beside short
# ones would make every short one compute (and keep in the cache) the long one's width.
_MAX_PADDING_SHARE = 0.25


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` in groups to prefill together: by length, each group
    padded to its longest with at most a quarter of its positions padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        if group is not None:
            width = lengths[index]  # the longest so far: `order` is ascending
            padding = sum(width - lengths[i] for i in group)
            if padding <= _MAX_PADDING_SHARE * width * (len(group) + 1):
                group.append(index)
                continue
        groups.append([index])
    return groups


class SelfAttentionRows:
    """A left-padded self-attention cache shared by the rows, and its mask."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length)

    def merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows, left-padding the shorter side so every row ends at the same column."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])

    def grow(self) -> torch.Tensor:
        """The mask with a column for the token this step feeds."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def keep(self, select: torch.Tensor) -> None:
        """Keep rows `select`, and drop the columns that are padding in all of them."""
        self.mask = self.mask.index_select(0, select)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, select)[:, :, start:]
            layer.values = layer.values.index_select(0, select)[:, :, start:]


def _select_cache(cache: DynamicCache, select: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, select)
        layer.values = layer.values.index_select(0, select)


class CausalBatch:
    def __init__(self, model: PreTrainedModel, advance: Advance):
        self.model = model
        self.device = next(model.parameters()).device
        self.advance = advance
        self.rows: list[Row] = []
        self.attention = SelfAttentionRows()
        self._last_logits = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def admit(self, requests: list) -> None:
        """Prefill the admitted requests in groups of similar length (left-padded, each
        behind its own soft prompt), answer their first tokens, and merge their rows
        into the batch."""
        lengths = [len(r.ids) + PromptPrefix.length(r.prefix.decoder) for r in requests]
        for group in prefill_groups(lengths):
            self._admit([requests[i] for i in group])

    @torch.inference_mode()
    def _admit(self, requests: list) -> None:
        pieces = []
        for request in requests:
            ids = torch.tensor([request.ids], device=self.device)  # (1, seq_len)
            embeds, _ = embed_with_prefix(self.model, ids, None, request.prefix.decoder)
            pieces.append(embeds[0])  # (virtual + seq_len, hidden)
        embeds, mask = _pack(pieces, left=True)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from its start
        with routed(_slots(requests)):
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **self._last_logits,
            )
        logits = out.logits[:, -1].float().cpu()  # (requests, vocab)
        keep, rows = [], []
        for index, request in enumerate(requests):
            event = self.advance(request, logits[index])
            if event is not None and not request.decoder.finished:
                keep.append(index)
                rows.append(Row(request, int(mask[index].sum()), event.token_id))
        if keep:
            select = torch.tensor(keep, device=self.device)
            _select_cache(out.cache, select)
            self.attention.merge(out.cache, mask.index_select(0, select))
            self.rows.extend(rows)

    @torch.inference_mode()
    def step(self) -> None:
        """One forward pass for every running row, then each row's own decision."""
        rows = self.rows
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)  # (rows, 1)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)  # (rows, 1)
        with routed(_slots(r.request for r in rows)):
            out = self.model(
                input_ids=tokens,
                attention_mask=self.attention.grow(),
                position_ids=positions,
                cache=self.attention.cache,
                use_cache=True,
            )
        self.attention.cache = out.cache
        logits = out.logits[:, -1].float().cpu()  # (rows, vocab)
        keep = advance_rows(rows, logits, self.advance)
        if len(keep) != len(rows):
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        if not indices:
            self.clear()
            return
        self.rows = [self.rows[i] for i in indices]
        self.attention.keep(torch.tensor(indices, device=self.device))

    def clear(self) -> None:
        self.rows, self.attention = [], SelfAttentionRows()


class Seq2SeqBatch:
    def __init__(self, model: PreTrainedModel, advance: Advance):
        self.model = model
        self.device = next(model.parameters()).device
        self.advance = advance
        self.start_token = model.config.decoder_start_token_id
        self.clear()

    def clear(self) -> None:
        self.rows: list[Row] = []
        self.attention = SelfAttentionRows()
        self.cross: DynamicCache | None = None  # (rows, heads, input length, dim) per layer
        self.encoded: torch.Tensor | None = None  # (rows, input length, hidden)
        self.input_mask: torch.Tensor | None = None  # (rows, input length)

    def admit(self, requests: list) -> None:
        """Encode the admitted requests' inputs in groups of similar length (right-padded,
        each behind its encoder prompt), run the decoder's first step (left-padded,
        behind its decoder prompt), answer the first tokens and merge the rows."""
        lengths = [len(r.ids) + PromptPrefix.length(r.prefix.encoder) for r in requests]
        for group in prefill_groups(lengths):
            self._admit([requests[i] for i in group])

    @torch.inference_mode()
    def _admit(self, requests: list) -> None:
        inputs, starts = [], []
        start = torch.tensor([[self.start_token]], device=self.device)  # (1, 1)
        for request in requests:
            ids = torch.tensor([request.ids], device=self.device)  # (1, seq_len)
            inputs.append(embed_with_prefix(self.model, ids, None, request.prefix.encoder)[0][0])
            starts.append(embed_with_prefix(self.model, start, None, request.prefix.decoder)[0][0])
        encoder_embeds, input_mask = _pack(inputs, left=False)
        decoder_embeds, decoder_mask = _pack(starts, left=True)
        with routed(_slots(requests)):
            encoded = self.model.get_encoder()(
                inputs_embeds=encoder_embeds, attention_mask=input_mask
            ).last_hidden_state  # (n, input length, hidden)
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                attention_mask=input_mask,
                decoder_inputs_embeds=decoder_embeds,
                decoder_attention_mask=decoder_mask,
                use_cache=True,
            )
        logits = out.logits[:, -1].float().cpu()
        keep, rows = [], []
        for index, request in enumerate(requests):
            event = self.advance(request, logits[index])
            if event is not None and not request.decoder.finished:
                keep.append(index)
                rows.append(Row(request, 0, event.token_id))
        if not keep:
            return
        select = torch.tensor(keep, device=self.device)
        cache = out.cache
        _select_cache(cache.self_attention_cache, select)
        _select_cache(cache.cross_attention_cache, select)
        self.attention.merge(cache.self_attention_cache, decoder_mask.index_select(0, select))
        self._merge_inputs(
            cache.cross_attention_cache,
            encoded.index_select(0, select),
            input_mask.index_select(0, select),
        )
        self.rows.extend(rows)

    def _merge_inputs(self, cross: DynamicCache, encoded: torch.Tensor, mask: torch.Tensor) -> None:
        """Append rows' encoder outputs and cross-attention cache, right-padding both
        sides to the longest input."""
        if self.cross is None:
            self.cross, self.encoded, self.input_mask = cross, encoded, mask
            return
        width = max(self.input_mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cross.layers, cross.layers, strict=True):
            mine.keys = torch.cat(
                [_right_pad(mine.keys, width, 2), _right_pad(theirs.keys, width, 2)]
            )
            mine.values = torch.cat(
                [_right_pad(mine.values, width, 2), _right_pad(theirs.values, width, 2)]
            )
        self.encoded = torch.cat(
            [_right_pad(self.encoded, width, 1), _right_pad(encoded, width, 1)]
        )
        self.input_mask = torch.cat(
            [_right_pad(self.input_mask, width, 1), _right_pad(mask, width, 1)]
        )

    @torch.inference_mode()
    def step(self) -> None:
        rows = self.rows
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)  # (rows, 1)
        cache = EncoderDecoderCache(self.attention.cache, self.cross)
        cache.is_updated = dict.fromkeys(range(len(self.cross.layers)), True)
        with routed(_slots(r.request for r in rows)):
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded),
                attention_mask=self.input_mask,
                decoder_input_ids=tokens,
                decoder_attention_mask=self.attention.grow(),
                cache=cache,
                use_cache=True,
            )
        self.attention.cache = out.cache.self_attention_cache
        self.cross = out.cache.cross_attention_cache
        logits = out.logits[:, -1].float().cpu()
        keep = advance_rows(rows, logits, self.advance)
        if len(keep) != len(rows):
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        if not indices:
            self.clear()
            return
        select = torch.tensor(indices, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        self.attention.keep(select)
        _select_cache(self.cross, select)
        self.encoded = self.encoded.index_select(0, select)
        self.input_mask = self.input_mask.index_select(0, select)
