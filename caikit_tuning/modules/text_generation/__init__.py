"""TextGeneration: serve a base model, or fine-tune all of its weights."""

from .text_generation import TextGeneration

__all__ = ["TextGeneration"]
