"""caikit_tuning: parameter-efficient tuning and text generation as caikit modules."""

import os
import sys
from pathlib import Path

# OpenMP threads spin between parallel regions before they sleep. libgomp reads how long
# when torch loads, so it is decided here, by the command that started this process.
# Training on its own keeps libgomp's default (300,000 spins): a step is many small
# kernels, and threads that slept in between wake too late (measured on 2 cores,
# SmolLM2-135M prompt tuning, the whole loop: 20 short-example steps 9.2-9.4 s against
# 14.3-14.5 s at 1,000 spins; 10 long-example steps 21.8-22.1 s against 27.4-28.0 s).
# A server spins briefly, and so do the training workers it starts (they inherit its
# environment), since they share the cores with its inference threads: with 8 REST
# clients busy, a 40-step job took 34-36 s at 1,000 spins and 114-216 s at the default,
# and the clients got 6.0-6.5 against 5.7-6.0 requests/s. Never spinning
# (OMP_WAIT_POLICY=PASSIVE) slowed concurrent serving to 117 tokens/s from 138.
# Explicit settings win.
SERVER_COMMANDS = ("caikit_tuning.runtime", "caikit.runtime")


def starts_a_server(argv: list[str]) -> bool:
    """Whether `argv` (the interpreter's command line) starts the caikit runtime."""
    pairs = zip(argv, argv[1:], strict=False)
    return any(
        (arg == "-m" and nxt in SERVER_COMMANDS)
        or (Path(arg).name == "caikit-tuning" and nxt == "serve")
        for arg, nxt in pairs
    )


if (
    "OMP_WAIT_POLICY" not in os.environ
    and "GOMP_SPINCOUNT" not in os.environ
    and starts_a_server(sys.orig_argv)
):
    os.environ["GOMP_SPINCOUNT"] = "1000"

import caikit  # noqa: E402
from caikit.core.registries import module_backend_types  # noqa: E402

# Library defaults first, so the runtime's config and environment variables override them.
caikit.configure(str(Path(__file__).parent / "config" / "config.yml"))


class MissingBackendType(AttributeError, ValueError):
    """caikit's registry of backend types answers a missing name with ValueError. pickle,
    looking for the module of an object (whichmodule), lets only AttributeError pass, so
    torch.compile's cache keys failed to pickle and no compiled graph was ever cached.
    This error is both."""


def _backend_type(registry: dict, name: str):
    if name in registry:
        return registry[name]
    raise MissingBackendType(f"backend type {name} not registered")


type(module_backend_types()).__getattr__ = _backend_type

from . import data_model, modules  # noqa: E402
from .data_model import (  # noqa: E402
    AdapterConfig,
    GenerationTrainRecord,
    QuantizationConfig,
    TrainGenerationRecord,
    TuningConfig,
)
from .modules import (  # noqa: E402
    InContextLearning,
    LoraTuning,
    PeftPromptTuning,
    TextGeneration,
)

__all__ = [
    "AdapterConfig",
    "GenerationTrainRecord",
    "InContextLearning",
    "LoraTuning",
    "PeftPromptTuning",
    "QuantizationConfig",
    "TextGeneration",
    "TrainGenerationRecord",
    "TuningConfig",
    "data_model",
    "modules",
]
