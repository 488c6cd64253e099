"""Prompt-tune SmolLM2-135M-Instruct on Rotten Tomatoes sentiment, in-process.

Prints the accuracy on held-out reviews of the untuned model (zero-shot, same task
description and verbalizer) and of the prompt-tuned one, both with the answer mapped to
positive/negative by category extraction. Run from the repository root:
python examples/prompt_tune_sentiment.py
"""

import argparse
import time
from pathlib import Path

import caikit
from caikit.core.data_model import DataStream

from caikit_tuning import InContextLearning, PeftPromptTuning, TuningConfig
from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2
from caikit_tuning.data import read_records_file
from caikit_tuning.modules.evaluation import balanced, evaluate

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}} Sentiment:"
DESCRIPTION = "Classify the sentiment of the movie review as positive or negative."
LABELS = ["positive", "negative"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--eval-rows", type=int, default=200, help="balanced held-out rows")
    parser.add_argument("--output", default=str(ROOT / "models" / "tuned" / "rt-sentiment-prompt"))
    args = parser.parse_args()

    prepare_smollm2(caikit.get_config().base_models_dir)
    records = read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl")[
        : args.steps * args.batch_size
    ]
    test_rows = balanced(
        read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl"), args.eval_rows
    )

    zero_shot = InContextLearning.train(NAME, task_description=DESCRIPTION, verbalizer=VERBALIZER)
    before = evaluate(zero_shot, test_rows, labels=LABELS, max_new_tokens=3)["accuracy"]
    print(f"zero-shot accuracy on {len(test_rows)} held-out reviews: {before:.3f}")

    started = time.perf_counter()
    model = PeftPromptTuning.train(
        base_model=NAME,
        train_stream=DataStream.from_iterable(records),
        tuning_config=TuningConfig(
            num_virtual_tokens=20,
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text=DESCRIPTION,
        ),
        verbalizer=VERBALIZER,
        num_epochs=1,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_source_length=128,
        max_target_length=4,
        silence_progress_bars=False,
    )
    info = model.training_config
    print(
        f"trained {info['steps']} steps on {len(records)} records in {time.perf_counter() - started:.0f}s "
        f"({info['real_tokens'] / info['seconds']:.0f} tokens/s), final loss {info['final_loss']:.3f}"
    )
    report = evaluate(model, test_rows, labels=LABELS, max_new_tokens=3)
    print(f"prompt-tuned accuracy: {report['accuracy']:.3f} (zero-shot {before:.3f})")
    for row, predicted in list(zip(test_rows, report["predictions"], strict=True))[:4]:
        print(f"  {row['output']:>8} <- {predicted:9} {row['input'][:64]}")
    model.save(args.output)
    print(f"saved the tuned prompt to {args.output}")


if __name__ == "__main__":
    main()
