"""Prompt-tune SmolLM2-135M-Instruct on the bundled reviews with a validation split and
early stopping, and keep the model's loss curve (training_curve.png) in
benchmarks/results/early_stopping/.

    python benchmarks/early_stopping_curve.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "early_stopping"))
    args = parser.parse_args()

    import caikit
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TuningConfig
    from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2

    prepare_smollm2(ROOT / caikit.get_config().base_models_dir)
    with open(ROOT / "data" / "rt_sentiment_train.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][: args.records]
    model = PeftPromptTuning.train(
        NAME,
        DataStream.from_iterable(rows),
        TuningConfig(
            num_virtual_tokens=20,
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text="Classify the sentiment of the movie review as positive or negative.",
        ),
        verbalizer="Review: {{input}} Sentiment:",
        num_epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=8,
        max_source_length=128,
        max_target_length=4,
        validation={
            "split_ratio": 0.1,
            "eval_steps": args.eval_steps,
            "accuracy_examples": 40,
            "early_stopping_patience": args.patience,
        },
        silence_progress_bars=False,
    )
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out / "model"))
    shutil.copy(out / "model" / "training_curve.png", out / "training_curve.png")
    shutil.copy(out / "model" / "training_logs.jsonl", out / "training_logs.jsonl")
    validations = [e for e in model.training_logs if "validation_loss" in e]
    summary = {
        "steps": model.training_config["steps"],
        "planned_steps": args.epochs * (args.records - args.records // 10 + 7) // 8,
        "stopped_early": model.training_config["stopped_early"],
        "best_step": model.training_config["best_step"],
        "validations": validations,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # The adapter is small; the curve and summary are the record. Drop the rest.
    shutil.rmtree(out / "model")
    print(json.dumps({k: v for k, v in summary.items() if k != "validations"}))
    for entry in validations:
        print(entry)


if __name__ == "__main__":
    main()
