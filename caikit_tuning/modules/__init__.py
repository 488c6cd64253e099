"""The caikit modules of caikit_tuning, one folder each."""

from . import caikit_nlp  # noqa: F401  (registers the readers of caikit-nlp's folders)
from .in_context import InContextLearning
from .lora import LoraTuning
from .prompt_tuning import PeftPromptTuning
from .text_generation import TextGeneration

__all__ = ["InContextLearning", "LoraTuning", "PeftPromptTuning", "TextGeneration"]
