"""TextGenerator: what a module's run() and run_stream_out() hand off to."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

from caikit.core.data_model import ProducerId
from caikit.interfaces.nlp.data_model import (
    GeneratedTextResult,
    GeneratedTextStreamResult,
    GeneratedToken,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..inputs.prefix import NO_PREFIX, PromptPrefix
from .adapters import AdapterUse
from .batching import engine_for
from .beams import beam_search
from .results import stream_results, unary_result
from .settings import GenerationSettings
from .stream import (
    PreparedPrompt,
    TokenStream,
    chat_prompt,
    prepare_prompt,
    stream_generation,
)


class TextGenerator:
    """Generates for one model: a base model, optionally with a soft prompt."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        producer: ProducerId,
        prefix: PromptPrefix = NO_PREFIX,
        chat: bool = False,
        adapter: AdapterUse | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.producer = producer
        self.prefix = prefix
        # A weight adapter attached to the (shared) model for each request's length.
        self.adapter = adapter
        # Models trained on chat records always see their input as a chat turn.
        self.chat = chat

    def start(
        self, text: str, settings: GenerationSettings, rendered: bool = False
    ) -> tuple[PreparedPrompt, TokenStream]:
        """Queue one generation of `text` (the model's input, as `model_input` makes it)
        and return its prompt and its stream of token events. `rendered`: `text` is a
        conversation already rendered with the chat template (see `chat_conversation`)."""
        templated = rendered or settings.apply_chat_template or self.chat
        if templated and not rendered:
            text = chat_prompt(self.tokenizer, text)
        prompt = prepare_prompt(self.model, self.tokenizer, text, self.prefix, settings, templated)
        release = _no_op
        if self.adapter is not None:
            slot = self.adapter.acquire()
            prompt = dataclasses.replace(prompt, slot=slot)
            release = functools.partial(self.adapter.release, slot)
        try:
            engine = engine_for(self.model) if settings.num_beams == 1 else None
            if engine is not None:
                events = engine.submit(self.tokenizer, prompt, self.prefix, settings)
            else:
                decode = beam_search if settings.num_beams > 1 else stream_generation
                events = decode(self.model, self.tokenizer, prompt, self.prefix, settings)
        except BaseException:
            release()
            raise
        return prompt, TokenStream(_releasing(events, release), getattr(events, "cancel", _no_op))

    def _start(self, text: str, settings: GenerationSettings):
        # Rendered here, so that preserve_input_text gives back what the model saw.
        templated = settings.apply_chat_template or self.chat
        if templated:
            text = chat_prompt(self.tokenizer, text)
        prompt, events = self.start(text, settings, rendered=templated)
        return prompt, events, self._common(text, prompt, settings)

    def _common(self, text: str, prompt: PreparedPrompt, settings: GenerationSettings) -> dict:
        input_tokens = None
        if settings.include_input_tokens:
            input_tokens = [
                GeneratedToken(text=self.tokenizer.decode([i]), logprob=None, rank=None)
                for i in prompt.ids
            ]
        sampling_seed = prompt.seed if settings.decoding_method.name == "SAMPLING" else None
        return {
            "producer": self.producer,
            "input_token_count": len(prompt.ids),
            "seed": sampling_seed,
            "prefix_text": text if settings.preserve_input_text else "",
            "input_tokens": input_tokens,
            "with_tokens": settings.include_logprobs or settings.include_ranks,
        }

    def generate(self, text: str, settings: GenerationSettings) -> GeneratedTextResult:
        _, events, common = self._start(text, settings)
        return unary_result(events, **common)

    def generate_stream(
        self, text: str, settings: GenerationSettings
    ) -> Iterator[GeneratedTextStreamResult]:
        # Validation and tokenization happen now, so a bad request fails before the
        # caller starts reading the stream.
        _, events, common = self._start(text, settings)
        return TokenStream(stream_results(events, **common), getattr(events, "cancel", _no_op))


def _no_op() -> None:
    """Nothing to cancel (beam search answers in one piece), or nothing to release."""


def _releasing(events, release):
    """`events`, then `release()` once they end, are closed or fail."""
    try:
        yield from events
    finally:
        release()
