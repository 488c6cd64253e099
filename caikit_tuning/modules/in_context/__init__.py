"""In-context learning: task description and few-shot examples, no training."""

from .in_context_learning import InContextLearning

__all__ = ["InContextLearning"]
