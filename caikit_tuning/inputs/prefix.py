"""Soft prompts as inputs: token embeddings with learned vectors in front of them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class PromptPrefix:
    """Learned vectors placed before the encoder's and/or the decoder's input.

    A causal LM only has a decoder; `encoder` is for encoder-decoder models.
    """

    # (num_virtual_tokens, hidden), or (batch, num_virtual_tokens, hidden) when each row
    # of a batch has its own prompt (multitask training).
    encoder: torch.Tensor | None = None
    decoder: torch.Tensor | None = None

    @staticmethod
    def length(vectors: torch.Tensor | None) -> int:
        return 0 if vectors is None else vectors.shape[-2]


NO_PREFIX = PromptPrefix()


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can project only some positions onto the vocabulary."""
    # torch.compile's wrapper and a PeftModel forward take **kwargs and hand them on:
    # ask the model they wrap.
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    forward = getattr(model, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def embed_with_prefix(
    model: PreTrainedModel,
    input_ids: torch.Tensor,  # (batch, seq_len)
    attention_mask: torch.Tensor | None,  # (batch, seq_len)
    vectors: torch.Tensor | None,  # (num_virtual_tokens, hidden) or (batch, ...)
    noise=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings with `vectors` prepended to every row, and the matching mask.
    `noise(embeds, mask)`, when given, perturbs the token embeddings (not the prompt)."""
    embeds = model.get_input_embeddings()(input_ids)  # (batch, seq_len, hidden)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if noise is not None:
        embeds = noise(embeds, attention_mask)
    if vectors is None:
        return embeds, attention_mask
    batch = input_ids.shape[0]
    prefix = vectors.to(embeds.dtype)
    if prefix.dim() == 2:
        prefix = prefix.unsqueeze(0).expand(batch, -1, -1)  # (batch, virtual, hidden)
    prefix_mask = attention_mask.new_ones(batch, prefix.shape[1])
    return torch.cat([prefix, embeds], dim=1), torch.cat([prefix_mask, attention_mask], dim=1)
