"""Token events -> caikit.interfaces.nlp results."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from caikit.core.data_model import ProducerId
from caikit.interfaces.nlp.data_model import (
    FinishReason,
    GeneratedTextResult,
    GeneratedTextStreamResult,
    GeneratedToken,
    TokenStreamDetails,
)

from .stream import TokenEvent


def _token(event: TokenEvent) -> GeneratedToken:
    return GeneratedToken(text=event.token_text or "", logprob=event.logprob, rank=event.rank)


def stream_results(
    events: Iterable[TokenEvent],
    producer: ProducerId,
    input_token_count: int,
    seed: int | None,
    prefix_text: str = "",
    input_tokens: list[GeneratedToken] | None = None,
    with_tokens: bool = False,
) -> Iterator[GeneratedTextStreamResult]:
    """One stream message per generated token; `prefix_text` (the preserved input)
    rides on the first message, and the last message carries the finish reason."""
    first = True
    for event in events:
        details = TokenStreamDetails(
            finish_reason=event.finish_reason or FinishReason.NOT_FINISHED,
            generated_tokens=event.generated_tokens,
            seed=seed,
            input_token_count=input_token_count,
        )
        yield GeneratedTextStreamResult(
            generated_text=(prefix_text if first else "") + event.text,
            tokens=[_token(event)] if with_tokens else None,
            details=details,
            producer_id=producer,
            input_tokens=input_tokens if first else None,
        )
        first = False


def unary_result(
    events: Iterable[TokenEvent],
    producer: ProducerId,
    input_token_count: int,
    seed: int | None,
    prefix_text: str = "",
    input_tokens: list[GeneratedToken] | None = None,
    with_tokens: bool = False,
) -> GeneratedTextResult:
    texts, tokens, last = [prefix_text], [], None
    for event in events:
        texts.append(event.text)
        if with_tokens:
            tokens.append(_token(event))
        last = event
    return GeneratedTextResult(
        generated_text="".join(texts),
        generated_tokens=last.generated_tokens if last else 0,
        finish_reason=last.finish_reason if last else FinishReason.NOT_FINISHED,
        producer_id=producer,
        input_token_count=input_token_count,
        seed=seed,
        tokens=tokens if with_tokens else None,
        input_tokens=input_tokens,
    )
