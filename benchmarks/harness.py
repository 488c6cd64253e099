"""What the serving benchmarks share: the base model to serve, and clients on threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_TEXTS = ["a gorgeous moving film", "a dull lifeless mess"] * 50


def base_models(model: str, workdir: Path) -> tuple[Path, str]:
    """The base_models_dir and base model name to serve, configured for caikit_tuning:
    "tiny" builds a tiny llama in `workdir`; any other name is one under the configured
    base_models_dir (models/base)."""
    import caikit

    if model == "tiny":
        from caikit_tuning.testing.tiny_models import build_tiny_llama

        base_dir = workdir / "base"
        build_tiny_llama(base_dir / "tiny", TINY_TEXTS)
    else:
        base_dir = (ROOT / caikit.get_config().base_models_dir).resolve()
    caikit.configure(config_dict={"base_models_dir": str(base_dir)})
    return base_dir, model


def run_threads(target: Callable[[], None], count: int) -> float:
    """Run `target` on `count` threads at once; the seconds until the last one ends."""
    began = time.perf_counter()
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began
