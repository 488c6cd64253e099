"""Session fixtures: tiny real models built offline, and the bundled data."""

import json
import os
from pathlib import Path

import caikit
import pytest

import caikit_tuning  # noqa: F401  (configures caikit)
from caikit_tuning.testing.tiny_models import build_tiny_llama, build_tiny_t5

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_records(name: str, limit: int | None = None) -> list[dict]:
    with open(DATA_DIR / name, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[:limit] if limit else rows


@pytest.fixture(scope="session")
def train_rows() -> list[dict]:
    return read_records("rt_sentiment_train.jsonl")


@pytest.fixture(scope="session")
def base_models_dir(tmp_path_factory, train_rows) -> Path:
    """A base_models_dir holding tiny-llama and tiny-t5, configured for the session."""
    root = tmp_path_factory.mktemp("base_models")
    texts = [row["input"] for row in train_rows[:1500]] + ["positive negative"] * 50
    build_tiny_llama(root / "tiny-llama", texts)
    build_tiny_t5(root / "tiny-t5", texts)
    caikit.configure(config_dict={"base_models_dir": str(root)})
    return root


@pytest.fixture(scope="session")
def tiny_llama(base_models_dir) -> Path:
    return base_models_dir / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_t5(base_models_dir) -> Path:
    return base_models_dir / "tiny-t5"
