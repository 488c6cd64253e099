"""Evaluate generation on held-out records: a served module's accuracy and per-label
counts, and the validation accuracy a training run reports."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from caikit.core.data_model import ProducerId

from ..base_models import BaseModel
from ..generation import GenerationSettings, TextGenerator
from ..generation.labels import LabelRule
from ..inputs import PromptPrefix
from ..training.fit import TrainingPlan


def balanced(
    records: list[dict], count: int, labels: tuple[str, ...] = ("positive", "negative")
) -> list[dict]:
    """The first count/len(labels) records of each label, interleaved: a balanced test set."""
    per_label = [
        [r for r in records if r["output"] == label][: count // len(labels)] for label in labels
    ]
    return [record for group in zip(*per_label, strict=False) for record in group]


def request_text(model: Any, record: dict) -> str:
    """What a client would send for `record`: its input, or (for a multi-field
    verbalizer) a JSON object of its fields."""
    verbalizer = getattr(model, "verbalizer", None)
    fields = verbalizer.fields if verbalizer is not None else ("input",)
    if fields == ("input",):
        return record["input"]
    return json.dumps({name: record[name] for name in fields})


def evaluate(
    model: Any,
    records: list[dict],
    labels: list[str] | None = None,
    label_match: str | None = None,
    label_fallback: str | None = None,
    max_new_tokens: int = 10,
    concurrency: int = 8,
) -> dict:
    """Greedy generation for every record, scored by exact match with its `output`
    (after label extraction, when `labels` are given). Requests run concurrently, so
    the batching engine decodes them together."""
    rule = LabelRule.parse(labels, label_match, label_fallback)

    def predict(record: dict) -> str:
        text = model.run(request_text(model, record), max_new_tokens=max_new_tokens).generated_text
        return rule.extract(text) if rule else text.strip()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        predictions = list(pool.map(predict, records))
    expected = [r["output"].strip() for r in records]
    hits = [p == e for p, e in zip(predictions, expected, strict=True)]
    names = sorted(set(expected) | set(predictions))
    return {
        "records": len(records),
        "accuracy": sum(hits) / len(records) if records else 0.0,
        "per_label": {
            name: {
                "expected": Counter(expected)[name],
                "predicted": Counter(predictions)[name],
                "correct": sum(h for h, e in zip(hits, expected, strict=True) if e == name),
            }
            for name in names
        },
        "predictions": predictions,
    }


def exact_match_accuracy(
    base: BaseModel,
    plan: TrainingPlan,
    prefix: Callable[[None], PromptPrefix],
    records: list[dict],
) -> Callable[[], float] | None:
    """Validation accuracy for training.fit: greedy exact match on the first
    validation.accuracy_examples records (None when there is nothing to score)."""
    if not records or not plan.training.validation.accuracy_examples:
        return None
    count = plan.training.validation.accuracy_examples
    sample = records[:count]
    verbalizer = plan.verbalizer
    settings = GenerationSettings(max_new_tokens=plan.training.max_target_length)

    def accuracy() -> float:
        base.model.eval()
        generator = TextGenerator(
            base.model, base.tokenizer, ProducerId("validation", "0"), prefix(None)
        )
        hits = sum(
            generator.generate(verbalizer.render(r), settings).generated_text.strip()
            == r["output"].strip()
            for r in sample
        )
        return hits / len(sample)

    return accuracy
