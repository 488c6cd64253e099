"""Language-model loss over target tokens only, with optional soft prompts in front."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..data.batching import Batch
from ..inputs.prefix import PromptPrefix, accepts_logits_to_keep, embed_with_prefix
from .linear_cross_entropy import fused_head, linear_cross_entropy
from .segment_attention import fits_window, uses_segment_attention


def summed_token_loss(
    model: PreTrainedModel, batch: Batch, prefix: PromptPrefix, noise_alpha: float | None = None
) -> torch.Tensor:
    """Sum of the cross-entropy of every target token in `batch` (a scalar).

    The caller divides by the number of target tokens of the whole accumulation window,
    so micro-batches of different sizes are weighted per token. `noise_alpha` adds
    NEFTune noise to the input token embeddings.
    """
    if model.config.is_encoder_decoder:
        return _seq2seq_loss(model, batch, prefix, noise_alpha)
    if batch.segment_lengths is not None:
        return _packed_causal_loss(model, batch, prefix, noise_alpha)
    return _causal_loss(model, batch, prefix, noise_alpha)


def _neftune(noise_alpha: float | None):
    """Uniform noise scaled by alpha / sqrt(length * hidden), each row by its own length
    (Jain et al. 2023)."""
    if not noise_alpha:
        return None

    def add_noise(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # embeds: (batch, seq_len, hidden); mask: (batch, seq_len)
        lengths = mask.sum(dim=1, keepdim=True).unsqueeze(-1).clamp(min=1)  # (batch, 1, 1)
        scale = noise_alpha / torch.sqrt(lengths * embeds.shape[-1])
        noise = torch.empty_like(embeds).uniform_(-1, 1) * scale
        return embeds + noise * mask.unsqueeze(-1)

    return add_noise


def _causal_loss(
    model: PreTrainedModel, batch: Batch, prefix: PromptPrefix, noise_alpha: float | None
) -> torch.Tensor:
    embeds, mask = embed_with_prefix(
        model, batch.input_ids, batch.attention_mask, prefix.decoder, _neftune(noise_alpha)
    )
    # Project only the positions that predict a target token onto the vocabulary:
    # for short answers that skips almost all of the LM head's work.
    positions = batch.target_positions + PromptPrefix.length(prefix.decoder)  # (batch, n_targets)
    return _target_loss(model, batch, positions, inputs_embeds=embeds, attention_mask=mask)


def _target_loss(
    model: PreTrainedModel, batch: Batch, positions: torch.Tensor, **inputs
) -> torch.Tensor:
    """Cross-entropy of the targets, projecting only `positions` (batch, n_targets) onto
    the vocabulary: for short answers that skips almost all of the LM head's work.
    Where the head is a plain linear layer, it is fused with the loss."""
    fused = fused_head(model)
    if fused is not None:
        decoder, head = fused
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (batch, seq, hidden)
        picked = torch.take_along_dim(hidden, positions[..., None], dim=1)
        return linear_cross_entropy(picked.flatten(0, 1), head.weight, batch.target_ids.flatten())
    if accepts_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    else:
        full = model(**inputs, use_cache=False).logits  # (batch, seq, vocab)
        logits = torch.take_along_dim(full, positions[..., None], dim=1)
    # logits: (batch, n_targets, vocab)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.target_ids.flatten(), ignore_index=-100, reduction="sum"
    )


def _packed_causal_loss(
    model: PreTrainedModel, batch: Batch, prefix: PromptPrefix, noise_alpha: float | None
) -> torch.Tensor:
    """One row holding every example, with position ids restarting per example:
    transformers then masks attention to stay within each example (no attention mask,
    no cache), so nothing is padding. Each example sits behind its own copy of the soft
    prompt; under `segment_attention` a prompt shared by all examples is in the row once
    instead, and each example's attention is computed on its own slice."""
    embeds = model.get_input_embeddings()(batch.input_ids)[0]  # (total, hidden)
    vectors = prefix.decoder  # None, (virtual, hidden) or (segments, virtual, hidden)
    virtual = PromptPrefix.length(vectors)
    lengths = batch.segment_lengths
    tokens = list(embeds.split(lengths))
    add_noise = _neftune(noise_alpha)
    if add_noise is not None:
        tokens = [add_noise(t[None], torch.ones(1, len(t), device=t.device))[0] for t in tokens]
    split = uses_segment_attention(model) and _fits_window(model, virtual, lengths)
    if split and vectors is not None and vectors.dim() == 2:
        return _shared_prompt_loss(model, batch, vectors.to(embeds.dtype), tokens)
    pieces, position_ids = [], []
    for index, own in enumerate(tokens):
        if virtual:
            pieces.append((vectors if vectors.dim() == 2 else vectors[index]).to(own.dtype))
        pieces.append(own)
        position_ids.append(torch.arange(virtual + len(own), device=own.device))
    inputs = {
        "inputs_embeds": torch.cat(pieces)[None],
        "position_ids": torch.cat(position_ids)[None],
    }
    if split:
        inputs["segment_lengths"] = [virtual + length for length in lengths]
    # Each example's targets move right by the prompts before it, its own included.
    positions = batch.target_positions + virtual * (batch.target_segments + 1)
    return _target_loss(model, batch, positions, **inputs)


def _shared_prompt_loss(
    model: PreTrainedModel, batch: Batch, prompt: torch.Tensor, tokens: list[torch.Tensor]
) -> torch.Tensor:
    """The row is [prompt, example 1, example 2, ...]; every example attends to the one
    prompt (segment_attention's `prefix_length`) and continues its positions."""
    virtual, device = prompt.shape[0], prompt.device
    position_ids = [torch.arange(virtual, device=device)] + [
        torch.arange(virtual, virtual + len(own), device=device) for own in tokens
    ]
    # A target predicted from just before its example's first token is predicted from
    # the prompt's last position; every other one moves right by the prompt.
    starts = torch.tensor([0, *batch.segment_lengths[:-1]], device=device).cumsum(0)
    before_first = batch.target_positions < starts[batch.target_segments]
    positions = torch.where(before_first, virtual - 1, batch.target_positions + virtual)
    return _target_loss(
        model,
        batch,
        positions,
        inputs_embeds=torch.cat([prompt, *tokens])[None],
        position_ids=torch.cat(position_ids)[None],
        segment_lengths=list(batch.segment_lengths),
        prefix_length=virtual,
    )


def _fits_window(model: PreTrainedModel, virtual: int, lengths: list[int]) -> bool:
    return fits_window(getattr(model.config, "sliding_window", None), virtual + max(lengths))


def _seq2seq_loss(
    model: PreTrainedModel, batch: Batch, prefix: PromptPrefix, noise_alpha: float | None
) -> torch.Tensor:
    encoder_embeds, encoder_mask = embed_with_prefix(
        model, batch.input_ids, batch.attention_mask, prefix.encoder, _neftune(noise_alpha)
    )
    decoder_embeds, decoder_mask = embed_with_prefix(
        model, batch.decoder_input_ids, batch.decoder_attention_mask, prefix.decoder
    )
    logits = model(
        inputs_embeds=encoder_embeds,
        attention_mask=encoder_mask,
        decoder_inputs_embeds=decoder_embeds,
        decoder_attention_mask=decoder_mask,
        use_cache=False,
    ).logits  # (batch, virtual + n_targets, vocab)
    logits = logits[:, PromptPrefix.length(prefix.decoder) :]
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.target_ids.flatten(), ignore_index=-100, reduction="sum"
    )
