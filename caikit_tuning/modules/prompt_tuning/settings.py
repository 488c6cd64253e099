"""Prompt-tuning settings, built from a request's `tuning_type` and `tuning_config` once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...data_model import PromptOutputModelType, PromptTuningInitMethod, TuningType
from ...data_model.values import described, member, message_fields

_INIT_ALIASES = {"AVERAGE_SOURCE_TASKS": "AVERAGE_SOURCE"}
_SOURCE_METHODS = (PromptTuningInitMethod.ONLY_SOURCE_SHARED, PromptTuningInitMethod.AVERAGE_SOURCE)
_TUNING_CONFIG_FIELDS = (
    "num_virtual_tokens",
    "prompt_tuning_init_method",
    "prompt_tuning_init_text",
    "prompt_tuning_init_source_model",
    "output_model_types",
    "num_ranks",
)
MAX_VIRTUAL_TOKENS = 1024


def _tuning_config_dict(tuning_config: Any) -> dict[str, Any]:
    if tuning_config is None:
        raise ValueError("`tuning_config` is required; give at least `num_virtual_tokens`.")
    return message_fields(tuning_config, _TUNING_CONFIG_FIELDS, "tuning_config")


@dataclass(frozen=True)
class PromptTuningSettings:
    tuning_type: TuningType
    num_virtual_tokens: int
    init_method: PromptTuningInitMethod
    init_text: str | None
    init_source_model: str | None
    # Where the prompt goes, encoder first: the order of the rows in the saved tensor.
    placements: tuple[PromptOutputModelType, ...]
    # Rank of the task-specific update (multitask prompt tuning).
    num_ranks: int = 1
    # What the request asked for that was read another way, as caikit-nlp reads it.
    notes: tuple[str, ...] = ()

    @property
    def multitask(self) -> bool:
        return self.tuning_type == TuningType.MULTITASK_PROMPT_TUNING

    @classmethod
    def from_request(
        cls, tuning_type: Any, tuning_config: Any, is_encoder_decoder: bool
    ) -> PromptTuningSettings:
        config = _tuning_config_dict(tuning_config)
        tuning = member(tuning_type or "PROMPT_TUNING", TuningType, "tuning_type")
        multitask = tuning == TuningType.MULTITASK_PROMPT_TUNING
        count = config.get("num_virtual_tokens")
        if count is None:  # not given, or 0 in a wire message (proto3 cannot tell)
            raise ValueError(
                "`tuning_config.num_virtual_tokens` must be an integer in "
                f"1..{MAX_VIRTUAL_TOKENS}; it is 0 or unset (a wire message cannot tell the two)."
            )
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not 0 < count <= MAX_VIRTUAL_TOKENS
        ):
            raise ValueError(
                f"`tuning_config.num_virtual_tokens` must be an integer in 1..{MAX_VIRTUAL_TOKENS}, "
                f"got {described(count)}."
            )
        method = member(
            config.get("prompt_tuning_init_method") or "RANDOM",
            PromptTuningInitMethod,
            "tuning_config.prompt_tuning_init_method",
            _INIT_ALIASES,
        )
        text = config.get("prompt_tuning_init_text")
        source = config.get("prompt_tuning_init_source_model")
        if method == PromptTuningInitMethod.TEXT and not (isinstance(text, str) and text.strip()):
            raise ValueError(
                "`tuning_config.prompt_tuning_init_text` is required when "
                "prompt_tuning_init_method is TEXT."
            )
        notes = ()
        if method != PromptTuningInitMethod.TEXT and text:
            # caikit-nlp (and PEFT) keep such a text but initialise RANDOM: so do we, saying so.
            notes = (
                f"tuning_config.prompt_tuning_init_text is not used: prompt_tuning_init_method "
                f"is {method.name}{' (unset means RANDOM, as in caikit-nlp)' if not config.get('prompt_tuning_init_method') else ''}; "
                "set it to TEXT to start from the text",
            )
        if method in _SOURCE_METHODS and not multitask:
            raise ValueError(
                f"`tuning_config.prompt_tuning_init_method` {method.name} initialises from a "
                "multitask source prompt and needs tuning_type MULTITASK_PROMPT_TUNING; use "
                "RANDOM, TEXT or LABELS with PROMPT_TUNING."
            )
        if method in _SOURCE_METHODS and not source:
            raise ValueError(
                f"`tuning_config.prompt_tuning_init_source_model` is required with "
                f"prompt_tuning_init_method {method.name}: name a source prompt under source_prompt_base."
            )
        if source and method not in _SOURCE_METHODS:
            raise ValueError(
                "`tuning_config.prompt_tuning_init_source_model` only applies to the source "
                "init methods (ONLY_SOURCE_SHARED, AVERAGE_SOURCE)."
            )
        ranks = config.get("num_ranks")
        if ranks is not None and not multitask:
            raise ValueError(
                "`tuning_config.num_ranks` only applies to tuning_type MULTITASK_PROMPT_TUNING."
            )
        ranks = 1 if ranks is None else ranks
        if isinstance(ranks, bool) or not isinstance(ranks, int) or not 0 < ranks <= 64:
            raise ValueError(
                f"`tuning_config.num_ranks` must be an integer in 1..64, got {ranks!r}."
            )
        return cls(
            tuning_type=tuning,
            num_virtual_tokens=count,
            init_method=method,
            init_text=text if method == PromptTuningInitMethod.TEXT else None,
            init_source_model=source or None,
            placements=_placements(config.get("output_model_types"), is_encoder_decoder),
            num_ranks=ranks,
            notes=notes,
        )


def _placements(value: Any, is_encoder_decoder: bool) -> tuple[PromptOutputModelType, ...]:
    field = "tuning_config.output_model_types"
    if not value:
        default = (
            PromptOutputModelType.ENCODER if is_encoder_decoder else PromptOutputModelType.DECODER
        )
        return (default,)
    if isinstance(value, str):
        value = [value]
    chosen = {member(v, PromptOutputModelType, field) for v in value}
    if not is_encoder_decoder and PromptOutputModelType.ENCODER in chosen:
        raise ValueError(
            f"`{field}` ENCODER needs an encoder-decoder model; a causal LM only has a DECODER."
        )
    # Encoder rows first, as PEFT lays out two-stack prompts.
    return tuple(
        t for t in (PromptOutputModelType.ENCODER, PromptOutputModelType.DECODER) if t in chosen
    )
