"""Prompt tuning: a learned soft prompt in front of a frozen base model."""

from .peft_prompt_tuning import PeftPromptTuning

__all__ = ["PeftPromptTuning"]
