"""caikit_tuning: parameter-efficient tuning and text generation as caikit modules."""

import os
import sys
from pathlib import Path

# OpenMP threads spin between parallel regions before they sleep. libgomp reads how long
# when torch loads, so it is decided here, by the command that started this process.
# Training keeps libgomp's default (300,000 spins): a step is many small kernels, and
# threads that slept in between wake too late (measured on 2 cores, SmolLM2-135M prompt
# tuning, the whole loop: 20 short-example steps 9.2-9.4 s against 14.3-14.5 s at 1,000
# spins; 10 long-example steps 21.8-22.1 s against 27.4-28.0 s). A server spins briefly,
# since its inference threads share the cores with the jobs it trains. Its CPU training
# workers go back to the default and give up a thread per core the server is using
# instead (training/core_share.py): with 8 REST clients busy, a 40-step job took 30 s that
# way, 36 s with both at 1,000 spins and 114-216 s at the default with all threads.
# Never spinning (OMP_WAIT_POLICY=PASSIVE) slowed concurrent serving to 117 tokens/s
# from 138. Explicit settings win.
SERVER_COMMANDS = ("caikit_tuning.runtime", "caikit.runtime")
SERVER_SPIN = "1000"


def starts_a_server(argv: list[str]) -> bool:
    """Whether `argv` (the interpreter's command line) starts the caikit runtime."""
    pairs = zip(argv, argv[1:], strict=False)
    return any(
        (arg == "-m" and nxt in SERVER_COMMANDS)
        or (Path(arg).name == "caikit-tuning" and nxt == "serve")
        for arg, nxt in pairs
    )


# Whether this process chose its spin (its workers then choose their own).
CHOSE_SERVER_SPIN = (
    "OMP_WAIT_POLICY" not in os.environ
    and "GOMP_SPINCOUNT" not in os.environ
    and starts_a_server(sys.orig_argv)
)
if CHOSE_SERVER_SPIN:
    os.environ["GOMP_SPINCOUNT"] = SERVER_SPIN

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
