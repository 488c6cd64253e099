"""One request, start to finish: prompt ids in, a stream of token events out."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from caikit.interfaces.nlp.data_model import FinishReason
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..inputs.prefix import PromptPrefix
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
    # The likeliest tokens at this step, (id, logprob) best first, when asked for.
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    seed: int
    # The request's weight adapter on the shared base model (generation/adapters.py);
    # 0: none.
    slot: int = 0


class TokenStream(Iterator):
    """A stream of results that another thread can cancel.

    The thread reading it may be waiting for the next token when its client goes away
    (a dropped HTTP or gRPC stream); `cancel()`, called from the transport's side,
    ends the generation at once and frees its batch row. Streams made while a
    `watch_streams()` block is open on this thread are recorded in it, so a transport
    can cancel the streams of a call that ended without reaching them itself.
    """

    def __init__(self, iterator: Iterator, cancel: Callable[[], None]):
        self._iterator = iterator
        self._cancel = cancel
        watched = getattr(_WATCHED, "streams", None)
        if watched is not None:
            watched.append(self)

    def __next__(self):
        return next(self._iterator)

    def cancel(self) -> None:
        self._cancel()

    def close(self) -> None:
        self.cancel()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


_WATCHED = threading.local()


@contextlib.contextmanager
def watch_streams(streams: list[TokenStream]):
    """Record in `streams` every TokenStream this thread makes inside the block."""
    outer = getattr(_WATCHED, "streams", None)
    _WATCHED.streams = streams
    try:
        yield streams
    finally:
        _WATCHED.streams = outer


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


def chat_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """`messages` ({"role", "content"} dicts) through the tokenizer's chat template,
    ending with an open assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; send a plain prompt instead."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class RequestDecoder:
    """One request's side of decoding: turns each step's logits into a TokenEvent.

    The model side (one sequence, or a batch shared with other requests) only has to
    feed it logits and then the chosen token.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt: PreparedPrompt,
        prefix: PromptPrefix,
        settings: GenerationSettings,
    ):
        self.settings = settings
        self.started = time.monotonic()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.chooser = TokenChooser(settings, prompt.ids, self.eos_ids, prompt.seed)
        # A causal LM's output continues its prompt; a decoder of a seq2seq model starts afresh.
        context = () if model.config.is_encoder_decoder else prompt.ids
        self.assembler = TextAssembler(tokenizer, settings.stop_sequences, context)
        self.limit = None if model.config.is_encoder_decoder else context_length(model)
        self.virtual = PromptPrefix.length(prefix.decoder)
        self.sequence = list(prompt.ids)
        self.count = 0
        self.finished = False

    def advance(self, logits: torch.Tensor) -> TokenEvent:
        """Choose the next token from `logits` (vocab,) and say what it means."""
        settings, assembler = self.settings, self.assembler
        choice = self.chooser.choose(logits, self.sequence)
        token = choice.token
        self.sequence.append(token)
        self.count += 1
        finish = None
        if token in self.eos_ids:
            finish = FinishReason.EOS_TOKEN
            text = assembler.finish()
        else:
            text = assembler.add(token)
            if assembler.stopped:
                finish = FinishReason.STOP_SEQUENCE
            elif self.count == settings.max_new_tokens:
                finish = FinishReason.MAX_TOKENS
            elif (
                settings.max_time is not None
                and time.monotonic() - self.started >= settings.max_time
            ):
                finish = FinishReason.TIME_LIMIT
            elif self.limit is not None and len(self.sequence) + self.virtual >= self.limit:
                finish = FinishReason.TOKEN_LIMIT
            if finish is not None:
                text += assembler.finish()
        details = settings.include_logprobs or settings.include_ranks or settings.top_logprobs
        token_text = assembler.token_text(token) if details else None
        self.finished = finish is not None
        return TokenEvent(
            token, text, token_text, choice.logprob, choice.rank, self.count, finish, choice.top
        )


def stream_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PreparedPrompt,
    prefix: PromptPrefix,
    settings: GenerationSettings,
) -> TokenStream:
    """Generate token by token on the reading thread; each event is yielded as soon as
    its token exists, and a cancelled stream stops before its next step."""
    stop = threading.Event()

    def tokens() -> Iterator[TokenEvent]:
        decoder = RequestDecoder(model, tokenizer, prompt, prefix, settings)
        session = DecodingSession(model, prompt.ids, prefix, prompt.slot)
        logits = session.prefill()
        while not stop.is_set():
            event = decoder.advance(logits)
            yield event
            if decoder.finished:
                return
            logits = session.step(event.token_id)

    return TokenStream(tokens(), stop.set)
