"""The model side of decoding: prefill a prompt, then one forward pass per new token.

The caller owns the choice of tokens (see decoding.py); this file only turns token ids
into next-token logits, keeping the KV cache between steps.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..inputs.prefix import PromptPrefix, accepts_logits_to_keep, embed_with_prefix
from .adapters import routed


class DecodingSession:
    """Next-token logits for one sequence, causal or encoder-decoder."""

    def __init__(
        self, model: PreTrainedModel, input_ids: list[int], prefix: PromptPrefix, slot: int = 0
    ):
        self.model = model
        self.slot = slot  # the weight adapter every forward pass routes to (0: none)
        self.device = next(model.parameters()).device
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        self._ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # (1, seq_len)
        self._prefix = prefix
        self._cache = None
        self._encoder_outputs = None
        self._mask: torch.Tensor | None = None  # (1, seq_len so far), causal only
        self._encoder_mask: torch.Tensor | None = None
        self._keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run the whole prompt; returns the logits of the first new token, (vocab,)."""
        with routed(self.slot or None):
            return self._prefill()

    def _prefill(self) -> torch.Tensor:
        if self.is_encoder_decoder:
            return self._prefill_seq2seq()
        embeds, self._mask = embed_with_prefix(self.model, self._ids, None, self._prefix.decoder)
        out = self.model(
            inputs_embeds=embeds, attention_mask=self._mask, use_cache=True, **self._keep_last
        )
        self._cache = out.cache
        return out.logits[0, -1].float()

    def _prefill_seq2seq(self) -> torch.Tensor:
        embeds, self._encoder_mask = embed_with_prefix(
            self.model, self._ids, None, self._prefix.encoder
        )
        self._encoder_outputs = self.model.get_encoder()(
            inputs_embeds=embeds, attention_mask=self._encoder_mask
        )
        start = torch.tensor([[self.model.config.decoder_start_token_id]], device=self.device)
        decoder_embeds, _ = embed_with_prefix(self.model, start, None, self._prefix.decoder)
        out = self.model(
            encoder_outputs=self._encoder_outputs,
            attention_mask=self._encoder_mask,
            decoder_inputs_embeds=decoder_embeds,
            use_cache=True,
        )
        self._cache = out.cache
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        """Feed the token just chosen; returns the logits of the next one, (vocab,)."""
        with routed(self.slot or None):
            return self._step(token_id)

    def _step(self, token_id: int) -> torch.Tensor:
        token = torch.tensor([[token_id]], dtype=torch.long, device=self.device)  # (1, 1)
        if self.is_encoder_decoder:
            out = self.model(
                encoder_outputs=self._encoder_outputs,
                attention_mask=self._encoder_mask,
                decoder_input_ids=token,
                cache=self._cache,
                use_cache=True,
            )
        else:
            self._mask = torch.cat([self._mask, self._mask.new_ones(1, 1)], dim=1)
            out = self.model(
                input_ids=token, attention_mask=self._mask, cache=self._cache, use_cache=True
            )
        self._cache = out.cache
        return out.logits[0, -1].float()
