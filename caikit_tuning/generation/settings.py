"""Generation parameters of one request, validated once where the request enters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..data_model import DecodingMethod, ExponentialDecayLengthPenalty

_SAMPLING_ONLY = ("top_k", "top_p", "typical_p", "temperature", "seed")
MAX_STOP_SEQUENCES = 16


def _enum(value: Any, enum_type, field: str):
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str) and value.upper() in enum_type.__members__:
        return enum_type[value.upper()]
    raise ValueError(f"`{field}` must be one of {list(enum_type.__members__)}, got {value!r}.")


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

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("decoding_method", _enum(self.decoding_method, DecodingMethod, "decoding_method"))
        _int(self.max_new_tokens, "max_new_tokens", minimum=1)
        _int(self.min_new_tokens, "min_new_tokens", minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"`min_new_tokens` ({self.min_new_tokens}) must not exceed `max_new_tokens` "
                f"({self.max_new_tokens})."
            )
        _int(self.truncate_input_tokens, "truncate_input_tokens", minimum=0)
        _int(self.num_beams, "num_beams", minimum=1)
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
            _int(self.top_k, "top_k", minimum=0)
        for name in ("top_p", "typical_p"):
            value = getattr(self, name)
            if value is not None and not (_number(value, name) and 0 < value <= 1):
                raise ValueError(f"`{name}` must be in (0, 1], got {value}.")
        for name in ("temperature", "repetition_penalty", "max_time"):
            value = getattr(self, name)
            if value is not None and not (_number(value, name) and value > 0):
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        if self.seed is not None:
            _int(self.seed, "seed", minimum=0)
        set_("exponential_decay_length_penalty", _decay(self.exponential_decay_length_penalty))
        set_("stop_sequences", _stops(self.stop_sequences))
        if self.num_beams > 1 and (self.include_logprobs or self.include_ranks):
            raise ValueError(
                "`include_logprobs` / `include_ranks` are not available with `num_beams` > 1."
            )

    @classmethod
    def from_request(cls, **values: Any) -> GenerationSettings:
        """Build from a request's parameters; None means "use the default"."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {unknown}; valid: {sorted(names)}.")
        return cls(**{k: v for k, v in values.items() if v is not None})


def _number(value: Any, field: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{field}` must be a number, got {type(value).__name__} {value!r}.")
    return True


def _int(value: Any, field: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{field}` must be an integer, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{field}` must be >= {minimum}, got {value}.")


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
    _int(start, "exponential_decay_length_penalty.start_index", minimum=0)
    if not (_number(factor, "exponential_decay_length_penalty.decay_factor") and factor >= 1.0):
        raise ValueError(
            f"`exponential_decay_length_penalty.decay_factor` must be >= 1.0, got {factor}."
        )
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
            raise ValueError(f"`stop_sequences` entries must be non-empty strings, got {stop!r}.")
    return stops
