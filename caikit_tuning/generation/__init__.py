"""Generation shared by every module: settings, decoding, streaming, results, the API."""

from .api import generation_api
from .generator import TextGenerator
from .settings import GenerationSettings

__all__ = ["GenerationSettings", "TextGenerator", "generation_api"]
