"""The caikit modules of caikit_tuning, one folder each."""

from .prompt_tuning import PeftPromptTuning

__all__ = ["PeftPromptTuning"]
