"""Task-type presets: batch size, accumulation, learning rate and epochs per tuning
method, used for the knobs a request leaves unset (in the manner of watsonx.ai's task
types). The values applied are recorded in the saved model's config.

The numbers are this project's starting points, tuned on the bundled sentiment data
for classification; generation and summarization use longer targets, so smaller
micro-batches with more accumulation and more epochs.
"""

from __future__ import annotations

from typing import Any

KNOBS = ("num_epochs", "learning_rate", "batch_size", "accumulate_steps")

# Each method's defaults when neither the request nor a preset sets a knob.
DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {
        "num_epochs": 20,
        "learning_rate": 0.3,
        "batch_size": 8,
        "accumulate_steps": 1,
    },
    "lora": {"num_epochs": 3, "learning_rate": 2e-4, "batch_size": 8, "accumulate_steps": 1},
    "full": {"num_epochs": 5, "learning_rate": 2e-5, "batch_size": 8, "accumulate_steps": 1},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "prompt_tuning": {
        "classification": {
            "num_epochs": 3,
            "learning_rate": 0.03,
            "batch_size": 8,
            "accumulate_steps": 1,
        },
        "generation": {
            "num_epochs": 10,
            "learning_rate": 0.03,
            "batch_size": 8,
            "accumulate_steps": 2,
        },
        "summarization": {
            "num_epochs": 10,
            "learning_rate": 0.03,
            "batch_size": 4,
            "accumulate_steps": 4,
        },
    },
    "lora": {
        "classification": {
            "num_epochs": 2,
            "learning_rate": 2e-4,
            "batch_size": 8,
            "accumulate_steps": 1,
        },
        "generation": {
            "num_epochs": 3,
            "learning_rate": 2e-4,
            "batch_size": 8,
            "accumulate_steps": 2,
        },
        "summarization": {
            "num_epochs": 3,
            "learning_rate": 1e-4,
            "batch_size": 4,
            "accumulate_steps": 4,
        },
    },
    "full": {
        "classification": {
            "num_epochs": 2,
            "learning_rate": 2e-5,
            "batch_size": 8,
            "accumulate_steps": 1,
        },
        "generation": {
            "num_epochs": 3,
            "learning_rate": 2e-5,
            "batch_size": 8,
            "accumulate_steps": 2,
        },
        "summarization": {
            "num_epochs": 3,
            "learning_rate": 1e-5,
            "batch_size": 4,
            "accumulate_steps": 4,
        },
    },
}


def apply_preset(method: str, preset: str | None, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every unset (None) knob taken from the preset, else the method's
    defaults. A request's own value always wins."""
    table = PRESETS[method]
    if preset is not None and preset != "":
        name = str(preset).lower()
        if name not in table:
            raise ValueError(f"`preset` must be one of {sorted(table)}, got {preset!r}.")
        fallback = {**DEFAULTS[method], **table[name]}
    else:
        fallback = DEFAULTS[method]
    return {**values, **{k: fallback[k] for k in KNOBS if values.get(k) is None}}
