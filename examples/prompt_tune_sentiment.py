"""Prompt-tune SmolLM2-135M-Instruct on Rotten Tomatoes sentiment, in-process.

Prints greedy exact-match accuracy on held-out reviews before and after tuning.
Run from the repository root: python examples/prompt_tune_sentiment.py
"""

import argparse
import json
import time
from pathlib import Path

import caikit
from caikit.core.data_model import DataStream, ProducerId

import caikit_tuning  # noqa: F401
from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.base_models.smollm2 import NAME, prepare_smollm2
from caikit_tuning.generation import GenerationSettings, TextGenerator

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}}\nIs this review positive or negative? Answer:"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def balanced(rows: list[dict], count: int) -> list[dict]:
    """The first count/2 rows of each label, interleaved."""
    pos = [r for r in rows if r["output"] == "positive"][: count // 2]
    neg = [r for r in rows if r["output"] == "negative"][: count // 2]
    return [row for pair in zip(pos, neg, strict=False) for row in pair]


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def mentioned_label(text: str) -> str:
    """The first of "positive" / "negative" the text mentions (lenient, for chat answers)."""
    text = text.lower()
    found = [(text.find(label), label) for label in ("positive", "negative") if label in text]
    return min(found)[1] if found else ""


def accuracy(generate, rows: list[dict], extract=first_word) -> float:
    hits = sum(extract(generate(row["input"])) == row["output"] for row in rows)
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--eval-rows", type=int, default=200, help="balanced held-out rows")
    parser.add_argument("--output", default=str(ROOT / "models" / "tuned" / "rt-sentiment-prompt"))
    args = parser.parse_args()

    prepare_smollm2(caikit.get_config().base_models_dir)
    train_rows = read_jsonl(ROOT / "data" / "rt_sentiment_train.jsonl")
    test_rows = balanced(read_jsonl(ROOT / "data" / "rt_sentiment_test.jsonl"), args.eval_rows)
    records = [TrainGenerationRecord(input=r["input"], output=r["output"]) for r in train_rows]
    records = records[: args.steps * args.batch_size]

    started = time.perf_counter()
    model = PeftPromptTuning.train(
        base_model=NAME,
        train_stream=DataStream.from_iterable(records),
        tuning_config=TuningConfig(
            num_virtual_tokens=args.virtual_tokens,
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text="Classify the sentiment of the movie review as positive or negative.",
        ),
        verbalizer=VERBALIZER,
        num_epochs=1,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_source_length=128,
        max_target_length=4,
        silence_progress_bars=False,
    )
    trained = time.perf_counter() - started
    info = model.training_config
    print(
        f"trained {info['steps']} steps on {len(records)} records in {trained:.0f}s "
        f"({info['real_tokens'] / info['seconds']:.0f} tokens/s), final loss {info['final_loss']:.3f}"
    )

    plain = TextGenerator(model.base.model, model.base.tokenizer, ProducerId("zero-shot", "0"))

    def zero_shot(text: str) -> str:
        # The untuned model at its best: its chat template, an instruction, and credit
        # for the first label its answer mentions.
        question = (
            f"Is this movie review positive or negative? Answer with one word.\nReview: {text}"
        )
        chat = model.base.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return plain.generate(chat, GenerationSettings(max_new_tokens=8)).generated_text

    def tuned(text: str) -> str:
        return model.run(text, max_new_tokens=3).generated_text

    before = accuracy(zero_shot, test_rows, extract=mentioned_label)
    after = accuracy(tuned, test_rows)
    print(
        f"accuracy on {len(test_rows)} held-out reviews: zero-shot (chat, lenient) {before:.3f}  "
        f"prompt-tuned (exact first word) {after:.3f}"
    )
    model.save(args.output)
    print(f"saved the tuned prompt to {args.output}")
    for row in test_rows[:4]:
        print(f"  {row['output']:>8} <- {tuned(row['input'])!r:14} {row['input'][:70]}")


if __name__ == "__main__":
    main()
