"""Adapter settings, built from a request's `adapter_config` once, and their PEFT configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, TaskType

from ...data_model.adapters import AdapterConfig, AdapterType
from ...data_model.values import flag, integer, member, message_fields, number

FIELD = "adapter_config"
BIASES = ("none", "all", "lora_only")
_COMMON_LORA = ("alpha", "dropout", "target_modules", "bias")
_ADALORA_ONLY = (
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "delta_t",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
)
# The fields each adapter type takes; every other field must be left unset.
APPLIES: dict[AdapterType, tuple[str, ...]] = {
    AdapterType.LORA: ("r", *_COMMON_LORA, "use_rslora", "use_dora"),
    AdapterType.ADALORA: (*_COMMON_LORA, *_ADALORA_ONLY),
    AdapterType.IA3: ("target_modules", "feedforward_modules"),
}
# target_modules / feedforward_modules default to layers found in the model (targets.py),
# AdaLoRA's total_step to the run's optimizer steps, alpha to twice the rank.
DEFAULTS: dict[AdapterType, dict[str, Any]] = {
    AdapterType.LORA: {
        "r": 8,
        "dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    },
    AdapterType.ADALORA: {
        "init_r": 12,
        "target_r": 8,
        "dropout": 0.0,
        "bias": "none",
        "tinit": 0,
        "tfinal": 0,
        "delta_t": 1,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
    },
    AdapterType.IA3: {},
}
# The fields of the wire type, in field-number order.
_WIRE_FIELDS: tuple[str, ...] = tuple(AdapterConfig.fields)


def _int(minimum: int):
    return lambda value, name: integer(value, f"{FIELD}.{name}", minimum)


def _fraction(value: Any, name: str) -> None:
    number(value, f"{FIELD}.{name}", 0.0, 1.0, high_open=True)


def _non_negative(value: Any, name: str) -> None:
    number(value, f"{FIELD}.{name}", 0.0)


def _flag(value: Any, name: str) -> None:
    flag(value, f"{FIELD}.{name}")


def _bias(value: Any, name: str) -> None:
    if value not in BIASES:
        raise ValueError(f"`{FIELD}.{name}` must be one of {list(BIASES)}, got {value!r}.")


def _names(value: Any, name: str) -> None:
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(
            f"`{FIELD}.{name}` must be a non-empty list of module names, got {value!r}."
        )


# How each field's value is checked, whichever adapter type it belongs to.
_CHECKS = {
    **dict.fromkeys(("r", "alpha", "target_r", "init_r", "delta_t", "total_step"), _int(1)),
    **dict.fromkeys(("tinit", "tfinal"), _int(0)),
    **dict.fromkeys(("dropout", "beta1", "beta2"), _fraction),
    "orth_reg_weight": _non_negative,
    **dict.fromkeys(("use_rslora", "use_dora"), _flag),
    "bias": _bias,
    **dict.fromkeys(("target_modules", "feedforward_modules"), _names),
}


@dataclass(frozen=True)
class AdapterSettings:
    """One adapter's settings; fields that do not apply to `adapter_type` are None."""

    adapter_type: AdapterType = AdapterType.LORA
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    # None until resolved against the model (targets.resolve_targets).
    target_modules: tuple[str, ...] | None = None
    bias: str | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    target_r: int | None = None
    init_r: int | None = None
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float | None = None
    beta2: float | None = None
    orth_reg_weight: float | None = None
    # None until the run's optimizer steps are known (with_total_step).
    total_step: int | None = None
    feedforward_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        given = {n: getattr(self, n) for n in _WIRE_FIELDS[1:] if getattr(self, n) is not None}
        check_applicable(self.adapter_type, list(given))
        for name, value in given.items():
            _CHECKS[name](value, name)
        self._check_relations()

    def _check_relations(self) -> None:
        if self.init_r is not None and self.target_r is not None and self.target_r > self.init_r:
            raise ValueError(
                f"`{FIELD}.target_r` ({self.target_r}) must be <= `init_r` ({self.init_r}): "
                "AdaLoRA prunes ranks from init_r down towards target_r."
            )
        if (
            self.total_step is not None
            and (self.tinit or 0) + (self.tfinal or 0) >= self.total_step
        ):
            raise ValueError(
                f"`{FIELD}.tinit` + `tfinal` ({self.tinit} + {self.tfinal}) must be < total_step "
                f"({self.total_step}), leaving steps to re-allocate ranks in; lower them or "
                "train for more steps."
            )
        if self.feedforward_modules and self.target_modules:
            missing = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if missing:
                raise ValueError(
                    f"`{FIELD}.feedforward_modules` {missing} must also be in target_modules "
                    f"{list(self.target_modules)}: IA3 scales the inputs of these target modules."
                )

    @classmethod
    def from_request(cls, adapter_config: Any) -> AdapterSettings:
        """Settings with every default applied except the model- and run-dependent ones."""
        values = requested_fields(adapter_config)
        kind = member(
            values.pop("adapter_type", None) or "LORA", AdapterType, f"{FIELD}.adapter_type"
        )
        check_applicable(kind, list(values))
        for name in ("target_modules", "feedforward_modules"):
            names = values.get(name)
            if isinstance(names, (str, list, tuple)):
                # Frozen settings hold tuples; anything else is refused by __post_init__.
                values[name] = (names,) if isinstance(names, str) else tuple(names)
        values = {**DEFAULTS[kind], **values}
        if "alpha" in APPLIES[kind] and values.get("alpha") is None:
            # Twice the rank: LoRA's usual choice, so the update scale stays alpha / r = 2.
            values["alpha"] = 2 * values["r" if kind == AdapterType.LORA else "init_r"]
        return cls(adapter_type=kind, **values)

    @classmethod
    def from_peft_config(cls, config: PeftConfig, field: str) -> AdapterSettings:
        """The settings of a saved PEFT adapter (to continue training it)."""
        kind = _PEFT_TYPES.get(type(config))
        if kind is None:
            raise ValueError(
                f"`{field}` holds a {config.peft_type} adapter; only {[t.name for t in APPLIES]} "
                "adapters can be continued here."
            )
        values = {name: getattr(config, peft_name) for name, peft_name in _PEFT_NAMES[kind]}
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(values.get(name), str):
                raise ValueError(
                    f"`{field}` selects its {name} with a pattern ({values[name]!r}); only "
                    "adapters with a list of module names can be continued here."
                )
            if values.get(name) is not None:
                values[name] = tuple(sorted(values[name]))
        return cls(adapter_type=kind, **values)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AdapterSettings:
        """Settings as `to_config` saved them in config.yml."""
        values = dict(config)
        kind = member(values.pop("adapter_type"), AdapterType, f"{FIELD}.adapter_type")
        for name in ("target_modules", "feedforward_modules"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(adapter_type=kind, **values)

    def to_config(self) -> dict[str, Any]:
        """The applicable fields, as plain values for config.yml."""
        config: dict[str, Any] = {"adapter_type": self.adapter_type.name}
        for name in APPLIES[self.adapter_type]:
            value = getattr(self, name)
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    def with_total_step(self, total_steps: int) -> AdapterSettings:
        """AdaLoRA's total_step defaults to the run's optimizer steps."""
        if self.adapter_type != AdapterType.ADALORA or self.total_step is not None:
            return self
        return dataclasses.replace(self, total_step=total_steps)


def check_applicable(kind: AdapterType, names: list[str]) -> None:
    """A field of another adapter type is an error naming the fields `kind` takes."""
    for name in names:
        if name not in APPLIES[kind]:
            owners = [t.name for t, fields in APPLIES.items() if name in fields]
            raise ValueError(
                f"`{FIELD}.{name}` only applies to {', '.join(owners)}; {kind.name} takes "
                f"{list(APPLIES[kind])}."
            )


def requested_fields(adapter_config: Any) -> dict[str, Any]:
    """The set fields of a request's adapter_config (an AdapterConfig or a dict)."""
    return message_fields(adapter_config, _WIRE_FIELDS, FIELD)


# ---------------------------------------------------------------- PEFT configs

# (our field, the PEFT config attribute) per adapter type.
_PEFT_NAMES: dict[AdapterType, tuple[tuple[str, str], ...]] = {
    AdapterType.LORA: (
        ("r", "r"),
        ("alpha", "lora_alpha"),
        ("dropout", "lora_dropout"),
        ("target_modules", "target_modules"),
        ("bias", "bias"),
        ("use_rslora", "use_rslora"),
        ("use_dora", "use_dora"),
    ),
    AdapterType.ADALORA: (
        ("alpha", "lora_alpha"),
        ("dropout", "lora_dropout"),
        ("target_modules", "target_modules"),
        ("bias", "bias"),
        ("target_r", "target_r"),
        ("init_r", "init_r"),
        ("tinit", "tinit"),
        ("tfinal", "tfinal"),
        ("delta_t", "deltaT"),
        ("beta1", "beta1"),
        ("beta2", "beta2"),
        ("orth_reg_weight", "orth_reg_weight"),
        ("total_step", "total_step"),
    ),
    AdapterType.IA3: (
        ("target_modules", "target_modules"),
        ("feedforward_modules", "feedforward_modules"),
    ),
}
_PEFT_CLASSES: dict[AdapterType, type[PeftConfig]] = {
    AdapterType.LORA: LoraConfig,
    AdapterType.ADALORA: AdaLoraConfig,
    AdapterType.IA3: IA3Config,
}
# AdaLoraConfig subclasses LoraConfig: look types up exactly, not with isinstance.
_PEFT_TYPES = {config_class: kind for kind, config_class in _PEFT_CLASSES.items()}


def peft_config(settings: AdapterSettings, is_encoder_decoder: bool) -> PeftConfig:
    """The PEFT config of fully resolved settings (targets found, total_step known)."""
    if settings.target_modules is None or (
        settings.adapter_type == AdapterType.IA3 and settings.feedforward_modules is None
    ):
        raise ValueError("adapter settings must have their target modules resolved first.")
    values = {}
    for name, peft_name in _PEFT_NAMES[settings.adapter_type]:
        value = getattr(settings, name)
        values[peft_name] = list(value) if isinstance(value, tuple) else value
    task = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM
    return _PEFT_CLASSES[settings.adapter_type](task_type=task, **values)
