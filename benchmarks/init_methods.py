"""Prompt-tuning init methods on a user's first job: RANDOM, TEXT and LABELS side by side.

The job: the first N bundled Rotten Tomatoes training reviews, 1 epoch, batch 8,
learning rate 0.03, 20 virtual tokens, verbalizer "Review: {{input}}\\nSentiment:";
scored by the first word of the greedy answer on the first M balanced held-out reviews.
Each init method runs with each seed; everything else is the same.
`--torch-dtype float32` and `--learning-rate` vary the precision and the rate.

    python benchmarks/init_methods.py                       # SmolLM2-135M-Instruct
    python benchmarks/init_methods.py --model tiny --records 16 --eval-rows 4 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}}\nSentiment:"
INIT_TEXT = "Classify the sentiment of the movie review as positive or negative."
METHODS = ("RANDOM", "TEXT", "LABELS")


def read_rows(name: str) -> list[dict]:
    with open(ROOT / "data" / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def balanced(rows: list[dict], count: int) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["output"], []).append(row)
    picked = []
    while len(picked) < count and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(picked) < count:
                picked.append(by_label[label].pop(0))
    return picked


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,!:;").lower() if words else ""


def run(
    base: str, method: str, seed: int, train: list[dict], test: list[dict], options: dict
) -> dict:
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

    config = {"num_virtual_tokens": 20, "prompt_tuning_init_method": method}
    if method == "TEXT":
        config["prompt_tuning_init_text"] = INIT_TEXT
    began = time.perf_counter()
    model = PeftPromptTuning.train(
        base,
        DataStream.from_iterable([TrainGenerationRecord(**row) for row in train]),
        TuningConfig(**config),
        verbalizer=VERBALIZER,
        num_epochs=1,
        batch_size=8,
        seed=seed,
        **options,
    )
    seconds = time.perf_counter() - began
    right = sum(
        first_word(model.run(row["input"], max_new_tokens=3).generated_text) == row["output"]
        for row in test
    )
    return {
        "method": method,
        "seed": seed,
        "accuracy": right / len(test),
        "train_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--learning-rate", type=float, default=0.03, help="0: the prompt-tuning preset's"
    )
    parser.add_argument("--torch-dtype", default=None, help='unset: bf16 autocast; "float32"')
    parser.add_argument("--name", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit

    import caikit_tuning  # noqa: F401

    train = read_rows("rt_sentiment_train.jsonl")[: args.records]
    test = balanced(read_rows("rt_sentiment_test.jsonl"), args.eval_rows)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            from caikit_tuning.testing.tiny_models import build_tiny_llama

            build_tiny_llama(Path(tmp) / "tiny", [row["input"] for row in train])
            caikit.configure(config_dict={"base_models_dir": tmp})
        options = {"learning_rate": args.learning_rate or None, "torch_dtype": args.torch_dtype}
        results = [
            run(args.model, method, seed, train, test, options)
            for seed in args.seeds
            for method in args.methods
        ]
    summary = {
        "model": args.model,
        "records": args.records,
        "eval_rows": len(test),
        "runs": results,
        "median_accuracy": {
            method: statistics.median(r["accuracy"] for r in results if r["method"] == method)
            for method in args.methods
        },
    }
    lines = [
        f"# Prompt-tuning init methods on a first job: {args.model}",
        "",
        f"{args.records} training reviews, 1 epoch, batch 8, lr {args.learning_rate or 'preset'}, "
        f"20 virtual tokens, torch_dtype {args.torch_dtype or 'unset (bf16 autocast)'}, "
        f"first-word accuracy on {len(test)} balanced held-out reviews; seeds {args.seeds}.",
        "",
        "| init | accuracy per seed | median | train s (median) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {method} | {', '.join(str(r['accuracy']) for r in results if r['method'] == method)} | "
            f"{summary['median_accuracy'][method]} | "
            f"{statistics.median(r['train_s'] for r in results if r['method'] == method)} |"
            for method in args.methods
        ),
    ]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"init_methods_{args.model}"
    (results_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
