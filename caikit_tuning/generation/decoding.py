"""The request side of decoding: choose each token, turn tokens into text, decide when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ..data_model import DecodingMethod
from .settings import GenerationSettings


class NonFiniteScores(ValueError):
    """A request's scores left the finite range: that request ends with this error."""


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """Scores after penalties and warpers, made safe to sample from: NaN can never be
    chosen, +inf is the largest finite score (a score pushed to infinity means "this
    one"). Raises when no token is left."""
    if bool(torch.isfinite(scores).all()):
        return scores
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    scores = scores.clamp(max=torch.finfo(scores.dtype).max)
    if bool(torch.isneginf(scores).all()):
        raise NonFiniteScores(
            "this request's generation parameters (temperature, repetition_penalty, "
            "exponential_decay_length_penalty, top_k / top_p / typical_p) left no token "
            "with a finite score; use values closer to the defaults."
        )
    return scores


class DecayTowardsEos(LogitsProcessor):
    """TGIS's exponential decay length penalty: `k` tokens past `start`, each EOS score
    grows by |score| * (factor**k - 1). The growth is capped at e**80 (about 5e34): by
    then EOS wins anyway, and an uncapped power overflows (Python raises, float32 turns
    to inf) a few hundred tokens in."""

    MAX_LOG_GROWTH = 80.0

    def __init__(self, start: int, factor: float, eos_ids: list[int]):
        self.start = start
        self.log_factor = math.log(factor)
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        past = input_ids.shape[-1] - self.start
        if past <= 0 or not self.eos_ids:
            return scores
        growth = math.exp(min(past * self.log_factor, self.MAX_LOG_GROWTH)) - 1
        eos = scores[:, self.eos_ids]  # (batch, eos ids)
        penalty = torch.where(torch.isfinite(eos), eos.abs() * growth, torch.zeros_like(eos))
        scores = scores.clone()
        scores[:, self.eos_ids] = eos + penalty
        return scores


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over the generated tokens only: a
    token's score drops by `presence` once it has been generated and by `frequency` for
    each time it has been."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_length :]  # (generated,)
        if generated.numel() == 0:
            return scores
        vocab = scores.shape[-1]
        counts = torch.bincount(generated[generated < vocab], minlength=vocab).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@dataclass(frozen=True)
class Choice:
    """The chosen token, and what was asked about it under the model's own distribution."""

    token: int
    logprob: float | None = None
    rank: int | None = None
    # The likeliest tokens with their log-probabilities, best first (top_logprobs).
    top: tuple[tuple[int, float], ...] | None = None


class TokenChooser:
    """Applies penalties and sampling warpers to one request's logits and picks a token."""

    def __init__(
        self, settings: GenerationSettings, prompt_ids: list[int], eos_ids: list[int], seed: int
    ):
        self.settings = settings
        self.sampling = settings.decoding_method == DecodingMethod.SAMPLING
        processors = LogitsProcessorList()
        if settings.repetition_penalty is not None:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.min_new_tokens > 0:
            processors.append(
                MinNewTokensLengthLogitsProcessor(len(prompt_ids), settings.min_new_tokens, eos_ids)
            )
        if settings.exponential_decay_length_penalty is not None:
            start, factor = settings.exponential_decay_length_penalty
            processors.append(DecayTowardsEos(start + len(prompt_ids), factor, eos_ids))
        if settings.presence_penalty or settings.frequency_penalty:
            processors.append(
                OccurrencePenalty(
                    len(prompt_ids), settings.presence_penalty, settings.frequency_penalty
                )
            )
        if self.sampling:
            if settings.temperature is not None and settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p is not None and settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
            if settings.typical_p is not None and settings.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(settings.typical_p))
        self.processors = processors
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, logits: torch.Tensor, sequence: list[int]) -> Choice:
        """Pick the next token from `logits` (vocab,), given prompt + generated ids so far.

        Returns the token and, when asked for, its log-probability, its rank and the
        likeliest alternatives under the model's own distribution.
        """
        scores = logits.cpu()
        if not torch.isfinite(scores).any():
            raise NonFiniteScores(
                "the model's next-token scores for this request are all NaN or infinite: "
                "the model or its weights are broken."
            )
        if self.processors:
            ids = torch.tensor([sequence], dtype=torch.long)  # (1, seq_len)
            scores = self.processors(ids, scores.unsqueeze(0))[0]
        scores = _finite(scores)
        if self.sampling:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        else:
            token = int(torch.argmax(scores))
        logprob = rank = top = None
        if self.settings.include_logprobs or self.settings.top_logprobs:
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
            logprob = float(logprobs[token])
            if self.settings.top_logprobs:
                values, ids = torch.topk(logprobs, self.settings.top_logprobs)
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        if self.settings.include_ranks:
            rank = int((logits > logits[token]).sum()) + 1
        return Choice(token, logprob, rank, top)


class TextAssembler:
    """Token ids -> text, released as soon as it is final.

    Text is held back while it could still change: an unfinished multi-byte character,
    or an ending that could be the start of a stop sequence. Stop sequences are looked
    for in the generated text only, and are cut from it.

    `context` (the prompt's last tokens) is decoded in front of the first generated
    tokens, so the text is what decoding the whole sequence would add: a tokenizer that
    joins words with spaces (WordPiece) or marks them on the token (SentencePiece) gives
    the first word its space, as `decode(prompt + output)` does.
    """

    CONTEXT_TOKENS = 4

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop_sequences: tuple[str, ...],
        context: list[int] | tuple[int, ...] = (),
    ):
        self.tokenizer = tokenizer
        self.stop_sequences = stop_sequences
        self.ids: list[int] = list(context[-self.CONTEXT_TOKENS :]) if context else []
        self.text = ""
        self.released = 0
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def token_text(self, token_id: int) -> str:
        return self._decode([token_id])

    def add(self, token_id: int) -> str:
        """Add one generated token; returns text that became final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # Decoding a window that starts one token back keeps word-joining spaces right.
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release whatever is held back."""
        if not self.stopped and self._read_offset < len(self.ids):
            before = self._decode(self.ids[self._prefix_offset : self._read_offset])
            after = self._decode(self.ids[self._prefix_offset :])
            self.text += after[len(before) :]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop_sequences and not self.stopped:
            # A stop sequence may straddle earlier text: search from where it could start.
            start = max(0, self.released - max(len(s) for s in self.stop_sequences) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop_sequences) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        end = max(end, self.released)
        released, self.released = self.text[self.released : end], end
        return released

    def _held_back(self) -> int:
        """Length of the longest ending of the text that begins some stop sequence."""
        longest = 0
        for stop in self.stop_sequences:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
