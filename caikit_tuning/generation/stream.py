"""One request, start to finish: prompt ids in, a stream of token events out."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from caikit.interfaces.nlp.data_model import FinishReason
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..base_models.prefix import PromptPrefix
from .decoding import TextAssembler, TokenChooser
from .engine import DecodingSession
from .settings import GenerationSettings


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it made final."""

    token_id: int
    text: str
    token_text: str | None
    logprob: float | None
    rank: int | None
    generated_tokens: int
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    seed: int


def context_length(model: PreTrainedModel) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def prepare_prompt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    prefix: PromptPrefix,
    settings: GenerationSettings,
    templated: bool = False,
) -> PreparedPrompt:
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    # A chat template already spells the special tokens the model expects.
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if settings.truncate_input_tokens and len(ids) > settings.truncate_input_tokens:
        # Keep the end of the prompt: it is what the answer continues.
        ids = ids[len(ids) - settings.truncate_input_tokens :]
    limit = context_length(model)
    virtual = PromptPrefix.length(prefix.decoder) + PromptPrefix.length(prefix.encoder)
    if limit is not None and not model.config.is_encoder_decoder and len(ids) + virtual >= limit:
        raise ValueError(
            f"`text` is {len(ids)} tokens (+{virtual} virtual tokens), which does not fit the "
            f"model's context of {limit}; set `truncate_input_tokens` to at most {limit - virtual - 1}."
        )
    seed = settings.seed if settings.seed is not None else random.randrange(2**32)
    return PreparedPrompt(ids=ids, seed=seed)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """`text` as the user turn of the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "`apply_chat_template` is set but this model's tokenizer has no chat template."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def stream_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PreparedPrompt,
    prefix: PromptPrefix,
    settings: GenerationSettings,
) -> Iterator[TokenEvent]:
    """Generate token by token; each event is yielded as soon as its token exists."""
    started = time.monotonic()
    eos_ids = eos_token_ids(model, tokenizer)
    chooser = TokenChooser(settings, prompt.ids, eos_ids, prompt.seed)
    assembler = TextAssembler(tokenizer, settings.stop_sequences)
    session = DecodingSession(model, prompt.ids, prefix)
    limit = context_length(model)
    virtual = PromptPrefix.length(prefix.decoder)
    sequence = list(prompt.ids)
    logits = session.prefill()
    for count in range(1, settings.max_new_tokens + 1):
        token, logprob, rank = chooser.choose(logits, sequence)
        sequence.append(token)
        finish = None
        if token in eos_ids:
            finish = FinishReason.EOS_TOKEN
            text = assembler.finish()
        else:
            text = assembler.add(token)
            if assembler.stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif count == settings.max_new_tokens:
                finish = FinishReason.MAX_TOKENS
            elif settings.max_time is not None and time.monotonic() - started >= settings.max_time:
                finish = FinishReason.TIME_LIMIT
            elif (
                limit is not None
                and not model.config.is_encoder_decoder
                and len(sequence) + virtual >= limit
            ):
                finish = FinishReason.TOKEN_LIMIT
            if finish is not None:
                text += assembler.finish()
        token_text = (
            assembler.token_text(token)
            if settings.include_logprobs or settings.include_ranks
            else None
        )
        yield TokenEvent(token, text, token_text, logprob, rank, count, finish)
        if finish is not None:
            return
        logits = session.step(token)
