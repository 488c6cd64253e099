"""Generation shared by every module: settings, decoding, streaming, results."""

from .generator import TextGenerator
from .settings import GenerationSettings

__all__ = ["GenerationSettings", "TextGenerator"]
