"""The inference API every generation module shares, defined once.

caikit builds the request messages from `run` / `run_stream_out` signatures, so every
module must expose the same explicit signature. Rather than copy twenty parameters
into each module, `@generation_api` adds these methods to a module class (it must sit
below `@module`). The class provides `self.generator` (a TextGenerator) and
`self.model_input(text)` (the text the model sees, e.g. a rendered verbalizer).
"""

import inspect
import types
from collections.abc import Iterable
from typing import List, Optional

from caikit.interfaces.nlp.data_model import (
    GeneratedTextResult,
    GeneratedTextStreamResult,
    Token,
    TokenizationResults,
)
from caikit.interfaces.nlp.tasks import TextGenerationTask, TokenizationTask

from ..config import library_settings
from ..data_model import ExponentialDecayLengthPenalty
from .labels import LabelRule
from .settings import GenerationSettings

_LABELS = ("labels", "label_match", "label_fallback")
_NOT_GENERATION = ("self", "text", "rule", *_LABELS)


def run(
    self,
    text: str = "",
    max_new_tokens: Optional[int] = 20,
    min_new_tokens: Optional[int] = 0,
    truncate_input_tokens: Optional[int] = 0,
    decoding_method: Optional[str] = "GREEDY",
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    typical_p: Optional[float] = None,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    repetition_penalty: Optional[float] = None,
    max_time: Optional[float] = None,
    exponential_decay_length_penalty: Optional[ExponentialDecayLengthPenalty] = None,
    stop_sequences: Optional[List[str]] = None,
    preserve_input_text: Optional[bool] = False,
    num_beams: Optional[int] = 1,
    include_logprobs: Optional[bool] = False,
    include_ranks: Optional[bool] = False,
    include_input_tokens: Optional[bool] = False,
    apply_chat_template: Optional[bool] = False,
    labels: Optional[List[str]] = None,
    label_match: Optional[str] = None,
    label_fallback: Optional[str] = None,
) -> GeneratedTextResult:
    """Generate a continuation of `text`.

    Args:
        text: the input (for tuned models it fills the verbalizer's {{input}}); may be
            empty (the wire cannot tell an empty string from a missing one).
        max_new_tokens: most tokens to generate. Default 20.
        min_new_tokens: EOS is suppressed until this many tokens exist. Default 0.
        truncate_input_tokens: keep only the last N input tokens (0: keep all).
        decoding_method: GREEDY or SAMPLING. Default GREEDY.
        top_k: SAMPLING: keep the k likeliest tokens.
        top_p: SAMPLING: keep the smallest set of tokens with probability >= top_p, in (0, 1].
        typical_p: SAMPLING: locally typical sampling mass, in (0, 1].
        temperature: SAMPLING: > 0; below 1 sharpens, above 1 flattens.
        seed: SAMPLING: random seed; the result reports the seed used.
        repetition_penalty: > 1 discourages repeating tokens.
        max_time: seconds after which generation stops (finish reason TIME_LIMIT).
        exponential_decay_length_penalty: push towards EOS after start_index tokens.
        stop_sequences: strings that end generation when generated; cut from the output.
        preserve_input_text: put the model's input text before the generated text.
        num_beams: > 1 is beam search (GREEDY only). Default 1.
        include_logprobs: report each generated token's log-probability.
        include_ranks: report each generated token's rank (1 = likeliest).
        include_input_tokens: report the input tokens.
        apply_chat_template: wrap the input as a user turn in the tokenizer's chat template.
        labels: classification: the generated text is replaced by one of these labels.
        label_match: how: contains (default; the label mentioned first), exact, or regex
            (labels given as label=pattern).
        label_fallback: the label when none matches (default: empty text).
    Returns:
        GeneratedTextResult with the text, token counts and finish reason.
    """
    rule = LabelRule.parse(labels, label_match, label_fallback)
    settings = request_settings(text, _generation_args(locals()))
    result = self.generator.generate(self.model_input(text), settings)
    if rule is not None:
        result.generated_text = rule.extract(result.generated_text)
    return result


def run_stream_out(self, text: str = "", **parameters) -> Iterable[GeneratedTextStreamResult]:
    """Like `run`, but yields one message per generated token as it is produced (beam
    search, which only knows its answer at the end, yields it as one message). Takes
    `run`'s parameters but the label ones (its signature is `run`'s, see below)."""
    values = _STREAM_SIGNATURE.bind(self, text, **parameters).arguments
    settings = request_settings(text, _generation_args(values))
    return self.generator.generate_stream(self.model_input(text), settings)


# run_stream_out's signature: run's, without the labels (a stream is not classified).
_STREAM_SIGNATURE = inspect.signature(run).replace(
    parameters=[p for name, p in inspect.signature(run).parameters.items() if name not in _LABELS],
    return_annotation=Iterable[GeneratedTextStreamResult],
)
run_stream_out.__signature__ = _STREAM_SIGNATURE
run_stream_out.__annotations__ = {
    **{p.name: p.annotation for p in _STREAM_SIGNATURE.parameters.values() if p.name != "self"},
    "return": Iterable[GeneratedTextStreamResult],
}


def run_tokenizer(self, text: str) -> TokenizationResults:
    """Split `text` into the model's tokens, with character offsets.

    Args:
        text: the text to tokenize (as given: no verbalizer, no special tokens).
    Returns:
        TokenizationResults: each token's text, start and end offsets, and the count.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    encoding = self.generator.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = [
        Token(start=start, end=end, text=text[start:end])
        for start, end in encoding["offset_mapping"]
    ]
    return TokenizationResults(results=tokens, token_count=len(tokens))


def _generation_args(call_locals: dict) -> dict:
    return {k: v for k, v in call_locals.items() if k not in _NOT_GENERATION}


def request_settings(text: str, values: dict) -> GenerationSettings:
    """The request's settings, within the server's limits (config `generation`)."""
    serving = library_settings().generation
    max_chars = serving.max_input_characters
    if max_chars and isinstance(text, str) and len(text) > max_chars:
        raise ValueError(
            f"`text` is {len(text)} characters; this server takes at most {max_chars} "
            "(generation.max_input_characters)."
        )
    return GenerationSettings.from_request(max_num_beams=serving.max_num_beams, **values)


_METHODS = (
    (run, TextGenerationTask, {}),
    (run_stream_out, TextGenerationTask, {"output_streaming": True}),
    (run_tokenizer, TokenizationTask, {}),
)


def generation_api(cls: type) -> type:
    """Give `cls` the shared run / run_stream_out / run_tokenizer task methods."""
    for function, task, options in _METHODS:
        method = types.FunctionType(
            function.__code__, function.__globals__, function.__name__, function.__defaults__
        )
        method.__annotations__ = dict(function.__annotations__)
        if hasattr(function, "__signature__"):
            method.__signature__ = function.__signature__
        method.__doc__ = function.__doc__
        # caikit files task methods under the defining class's qualified name.
        method.__module__ = cls.__module__
        method.__qualname__ = f"{cls.__qualname__}.{function.__name__}"
        setattr(cls, function.__name__, task.taskmethod(**options)(method))
    return cls
