"""Beam search, through transformers' own implementation, with the same results shape."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from caikit.interfaces.nlp.data_model import FinishReason
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..inputs.prefix import PromptPrefix, embed_with_prefix
from .adapters import routed
from .decoding import TextAssembler
from .settings import GenerationSettings
from .stream import PreparedPrompt, TokenEvent, eos_token_ids


def beam_search(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PreparedPrompt,
    prefix: PromptPrefix,
    settings: GenerationSettings,
) -> Iterator[TokenEvent]:
    """Search `num_beams` beams; the answer exists only at the end, so it comes as one event."""
    encoder_decoder = bool(model.config.is_encoder_decoder)
    if encoder_decoder and prefix.decoder is not None:
        raise ValueError(
            "`num_beams` > 1 is not available for prompts placed before the decoder of an "
            "encoder-decoder model; use num_beams 1."
        )
    started = time.monotonic()
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)  # (1, seq_len)
    vectors = prefix.encoder if encoder_decoder else prefix.decoder
    embeds, mask = embed_with_prefix(model, ids, None, vectors)
    options = {
        "num_beams": settings.num_beams,
        "do_sample": False,
        "early_stopping": True,
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if settings.repetition_penalty is not None:
        options["repetition_penalty"] = settings.repetition_penalty
    if settings.max_time is not None:
        options["max_time"] = settings.max_time
    if settings.exponential_decay_length_penalty is not None:
        options["exponential_decay_length_penalty"] = settings.exponential_decay_length_penalty
    with torch.inference_mode(), routed(prompt.slot or None):
        output = model.generate(inputs_embeds=embeds, attention_mask=mask, **options)[0].tolist()
    if encoder_decoder:
        output = output[1:]  # the decoder start token
    # Beams that ended early are padded; keep the tokens up to and including EOS.
    tokens = []
    for token in output:
        tokens.append(token)
        if token in eos_ids:
            break
    assembler = TextAssembler(
        tokenizer, settings.stop_sequences, () if encoder_decoder else prompt.ids
    )
    text = "".join(assembler.add(t) for t in tokens if t not in eos_ids) + assembler.finish()
    if assembler.stopped:
        finish = FinishReason.STOP_SEQUENCE
    elif tokens and tokens[-1] in eos_ids:
        finish = FinishReason.EOS_TOKEN
    elif settings.max_time is not None and time.monotonic() - started >= settings.max_time:
        finish = FinishReason.TIME_LIMIT
    else:
        finish = FinishReason.MAX_TOKENS
    yield TokenEvent(tokens[-1] if tokens else -1, text, None, None, None, len(tokens), finish)
