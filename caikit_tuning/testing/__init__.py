"""Tiny real models built offline, for the tests, benchmarks and examples."""

from .tiny_models import build_tiny_llama, build_tiny_t5

__all__ = ["build_tiny_llama", "build_tiny_t5"]
