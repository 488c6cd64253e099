"""Accuracy of every way this project adapts a model, side by side, on the bundled
Rotten Tomatoes reviews with the real SmolLM2-135M-Instruct.

In one run: zero-shot and few-shot (k examples, random and semantic retrieval)
in-context learning, prompt tuning, multitask prompt tuning and LoRA, the trained ones
for the same number of optimizer steps on the same records. Every model is scored on
the same balanced held-out reviews with greedy decoding and category extraction
(labels positive/negative, `contains`), and the trained ones also report train
tokens/s. Results go to benchmarks/results/quality_comparison.{json,md}.

    python benchmarks/quality_comparison.py                 # 200 steps, 200 test rows
    python benchmarks/quality_comparison.py --steps 5 --eval-rows 20 --only prompt_tuning
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}} Sentiment:"
DESCRIPTION = "Classify the sentiment of each movie review as positive or negative."
LABELS = ["positive", "negative"]


def variants(args, train_rows):
    """name -> a function building the model (and its training seconds/tokens)."""
    from caikit.core.data_model import DataStream

    from caikit_tuning import InContextLearning, LoraTuning, PeftPromptTuning, TuningConfig
    from caikit_tuning.bundled.minilm import prepare_minilm

    common = {
        "verbalizer": VERBALIZER,
        "num_epochs": 1,
        "batch_size": args.batch_size,
        "max_source_length": 128,
        "max_target_length": 4,
        "seed": 42,
    }
    records = train_rows[: args.steps * args.batch_size]
    init = {
        "num_virtual_tokens": 20,
        "prompt_tuning_init_method": "TEXT",
        "prompt_tuning_init_text": DESCRIPTION,
    }
    pool = DataStream.from_iterable(train_rows[:2000])

    def in_context(k, retrieval, embedding=None):
        return lambda: InContextLearning.train(
            args.model,
            pool,
            task_description=DESCRIPTION,
            verbalizer=VERBALIZER,
            num_examples=k,
            retrieval=retrieval,
            embedding_model=embedding,
        )

    return {
        "zero_shot": in_context(0, "random"),
        "few_shot_random_k4": in_context(4, "random"),
        "few_shot_semantic_k4": lambda: (
            prepare_minilm(args.base_models_dir),
            in_context(4, "semantic", "all-MiniLM-L6-v2")(),
        )[1],
        "prompt_tuning": lambda: PeftPromptTuning.train(
            args.model,
            DataStream.from_iterable(records),
            TuningConfig(**init),
            learning_rate=args.prompt_lr,
            **common,
        ),
        "multitask_prompt_tuning": lambda: PeftPromptTuning.train(
            args.model,
            DataStream.from_iterable(records),
            TuningConfig(**init),
            tuning_type="MULTITASK_PROMPT_TUNING",
            learning_rate=args.prompt_lr,
            **common,
        ),
        "lora_r8": lambda: LoraTuning.train(
            args.model,
            DataStream.from_iterable(records),
            adapter_config={"adapter_type": "LORA", "r": 8},
            learning_rate=args.lora_lr,
            **common,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-lr", type=float, default=0.03)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--name", default="quality_comparison")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit

    import caikit_tuning  # noqa: F401
    from caikit_tuning.bundled.smollm2 import prepare_smollm2
    from caikit_tuning.data import read_records_file
    from caikit_tuning.modules.evaluation import balanced, evaluate

    args.base_models_dir = ROOT / caikit.get_config().base_models_dir
    prepare_smollm2(args.base_models_dir)
    train_rows = read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl")
    test_rows = balanced(
        read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl"), args.eval_rows
    )
    results = {}
    for name, build in variants(args, train_rows).items():
        if args.only and name not in args.only:
            continue
        began = time.perf_counter()
        model = build()
        built = time.perf_counter() - began
        info = getattr(model, "training_config", {}) or {}
        report = evaluate(model, test_rows, labels=LABELS, label_fallback="none", max_new_tokens=3)
        results[name] = {
            "accuracy": round(report["accuracy"], 4),
            "per_label": report["per_label"],
            "train_steps": info.get("steps"),
            "train_tokens_per_second": round(info["real_tokens"] / info["seconds"], 1)
            if info.get("seconds")
            else None,
            "final_loss": info.get("final_loss"),
            "build_seconds": round(built, 1),
        }
        print(f"{name:28} accuracy {results[name]['accuracy']:.3f}  {results[name]}", flush=True)
        del model

    lines = [
        f"# Sentiment accuracy by adaptation method: {args.model}",
        "",
        f"{len(test_rows)} balanced held-out reviews, greedy, labels extracted with `contains` "
        f"(fallback `none`). Trained methods: {args.steps} steps x batch {args.batch_size}, 1 epoch over "
        f"the first {args.steps * args.batch_size} training records, verbalizer `{VERBALIZER}`; prompt "
        f"methods lr {args.prompt_lr} (20 virtual tokens, TEXT init), LoRA r=8 lr {args.lora_lr}. "
        "Few-shot examples come from the first 2,000 training records.",
        "",
        "| method | accuracy | train steps | train tokens/s | final train loss |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {r['accuracy']:.3f} | {r['train_steps'] or '-'} | {r['train_tokens_per_second'] or '-'} | "
            f"{r['final_loss'] if r['final_loss'] is not None else '-'} |"
            for name, r in results.items()
        ),
        "",
    ]
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
