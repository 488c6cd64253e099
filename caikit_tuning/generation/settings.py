"""Generation parameters of one request, validated once where the request enters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import alog

from ..data_model import DecodingMethod, ExponentialDecayLengthPenalty
from ..data_model.values import WrongType, described, integer, member, number

log = alog.use_channel("GENSET")

_SAMPLING_ONLY = ("top_k", "top_p", "typical_p", "temperature", "seed")
# Clients of caikit-nlp and TGIS send one parameter set for every request: proto3 zeros
# where a knob is unset, sampling knobs beside GREEDY. Both mean "not asked for".
_UNSET_WHEN_ZERO = ("top_k", "top_p", "typical_p", "temperature", "repetition_penalty", "max_time")
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
# Counts and lengths fit a signed 32-bit integer; seeds an unsigned 64-bit one.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**64 - 1
# Numerically safe ranges: inside them no score can overflow float32 (logits are a
# few tens at most; dividing them by 1e-3 or multiplying by 1e2 stays far from 3.4e38).
# Outside them a request could turn its scores into inf / NaN.
TEMPERATURE_RANGE = (1e-3, 1e3)
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
# Below 1 the penalty pulls away from EOS (as caikit-nlp allows); the growth is capped
# (decoding.DecayTowardsEos), so any factor here is safe.
DECAY_FACTOR_RANGE = (1e-3, 10.0)
# Beam search multiplies a request's memory and compute by the beam count: the
# operator's limit is generation.max_num_beams.
DEFAULT_MAX_NUM_BEAMS = 8
# OpenAI's ranges for its presence / frequency penalties and its alternatives per token.
PENALTY_RANGE = (-2.0, 2.0)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    decoding_method: DecodingMethod = DecodingMethod.GREEDY
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    max_time: float | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    stop_sequences: tuple[str, ...] = ()
    truncate_input_tokens: int = 0
    preserve_input_text: bool = False
    num_beams: int = 1
    include_logprobs: bool = False
    include_ranks: bool = False
    include_input_tokens: bool = False
    apply_chat_template: bool = False
    # OpenAI's knobs (runtime/openai_api.py); caikit's run() does not offer them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("decoding_method", member(self.decoding_method, DecodingMethod, "decoding_method"))
        integer(self.max_new_tokens, "max_new_tokens", 1, MAX_COUNT)
        integer(self.min_new_tokens, "min_new_tokens", 0, MAX_COUNT)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"`min_new_tokens` ({self.min_new_tokens}) must not exceed `max_new_tokens` "
                f"({self.max_new_tokens})."
            )
        integer(self.truncate_input_tokens, "truncate_input_tokens", 0, MAX_COUNT)
        integer(self.num_beams, "num_beams", 1, MAX_COUNT)
        if self.decoding_method == DecodingMethod.GREEDY:
            given = [name for name in _SAMPLING_ONLY if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(f'`{n}`' for n in given)} only apply to decoding_method "
                    "SAMPLING; set decoding_method to SAMPLING or leave them unset."
                )
        elif self.num_beams > 1:
            raise ValueError("`num_beams` > 1 is beam search, which needs decoding_method GREEDY.")
        if self.top_k is not None:
            integer(self.top_k, "top_k", 0, MAX_COUNT)
        for name in ("top_p", "typical_p"):
            if getattr(self, name) is not None:
                number(getattr(self, name), name, 0.0, 1.0, low_open=True)
        if self.temperature is not None:
            _in_range(self.temperature, "temperature", TEMPERATURE_RANGE)
        if self.repetition_penalty is not None:
            _in_range(self.repetition_penalty, "repetition_penalty", REPETITION_PENALTY_RANGE)
        if self.max_time is not None:
            number(self.max_time, "max_time", 0.0, low_open=True)
        if self.seed is not None:
            integer(self.seed, "seed", 0, MAX_SEED)
        for name in ("presence_penalty", "frequency_penalty"):
            number(getattr(self, name), name, *PENALTY_RANGE)
        integer(self.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        set_("exponential_decay_length_penalty", _decay(self.exponential_decay_length_penalty))
        set_("stop_sequences", _stops(self.stop_sequences))
        if self.num_beams > 1 and (
            self.include_logprobs or self.include_ranks or self.top_logprobs
        ):
            raise ValueError(
                "`include_logprobs` / `include_ranks` / `top_logprobs` are not available with "
                "`num_beams` > 1."
            )

    @classmethod
    def from_request(cls, max_num_beams: int = DEFAULT_MAX_NUM_BEAMS, **values: Any):
        """Build from a request's parameters, read as the ecosystem's clients mean them:
        None, and 0 for the knobs in _UNSET_WHEN_ZERO, mean "use the default";
        sampling knobs beside GREEDY are ignored (as caikit-nlp and TGIS do). What was
        ignored is logged. A direct GenerationSettings(...) call stays strict."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {unknown}; valid: {sorted(names)}.")
        values = {k: v for k, v in values.items() if v is not None}
        ignored = [k for k in _UNSET_WHEN_ZERO if k in values and _is_zero(values[k])]
        method = values.get("decoding_method", DecodingMethod.GREEDY)
        if member(method, DecodingMethod, "decoding_method") == DecodingMethod.GREEDY:
            ignored += [k for k in _SAMPLING_ONLY if k in values and k not in ignored]
        if ignored:
            log.info(
                "generation request: ignored %s (unset, or SAMPLING-only with GREEDY)", ignored
            )
        settings = cls(**{k: v for k, v in values.items() if k not in ignored})
        if settings.num_beams > max_num_beams:
            raise ValueError(
                f"`num_beams` may be at most {max_num_beams} on this server "
                f"(generation.max_num_beams), got {settings.num_beams}."
            )
        return settings


def _is_zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0


def _in_range(value: Any, field: str, bounds: tuple[float, float]) -> None:
    try:
        number(value, field, *bounds)
    except ValueError as err:
        if isinstance(err, WrongType):
            raise
        raise ValueError(f"{err} Values outside it make the scores overflow.") from None


def _decay(value: Any) -> tuple[int, float] | None:
    if value is None:
        return None
    if isinstance(value, ExponentialDecayLengthPenalty):
        value = (value.start_index, value.decay_factor)
    elif isinstance(value, dict):
        value = (value.get("start_index"), value.get("decay_factor"))
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            "`exponential_decay_length_penalty` must be (start_index, decay_factor), "
            f"got {value!r}."
        )
    start, factor = value
    integer(start, "exponential_decay_length_penalty.start_index", 0, MAX_COUNT)
    _in_range(factor, "exponential_decay_length_penalty.decay_factor", DECAY_FACTOR_RANGE)
    return int(start), float(factor)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise TypeError("`stop_sequences` must be a list of strings, got a single string.")
    stops = tuple(value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(
            f"`stop_sequences` may hold at most {MAX_STOP_SEQUENCES} entries, got {len(stops)}."
        )
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise ValueError(
                f"`stop_sequences` entries must be non-empty strings, got {described(stop)}."
            )
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise ValueError(
                f"`stop_sequences` entries may be at most {MAX_STOP_SEQUENCE_CHARS} characters, "
                f"got one of {len(stop)}."
            )
    return stops
