"""Prompt-tuning accuracy on the bundled labelled sets, side by side with the baseline.

A user's first job on each set: the first N training records, 1 epoch, batch 8, 20
virtual tokens, one learning rate, a verbalizer per set. Variants, each with each seed:

- `project`: `PeftPromptTuning.train` at its default precision (bf16 autocast on a CPU
  with native bf16, float32 otherwise);
- `project_fp32`: the same with `torch_dtype="float32"`;
- `project_bf16`: the same with `torch_dtype="bfloat16"` (bfloat16 weights, no autocast,
  as on a GPU; the soft prompt stays float32);
- `baseline`: `transformers.Trainer` + `peft` (benchmarks/peft_baseline.py), float32.

Every trained prompt is scored the same way: loaded as a PEFT adapter onto the float32
base model, greedy decoding of 3 tokens for each of M balanced held-out rows, and the
first word of the answer against the label. `--inits` picks the init methods (the
baseline has RANDOM and TEXT: peft has no label init), `--learning-rate 0` uses the
project's default rate (the baseline, which needs one, is then left out).

    python benchmarks/prompt_quality.py                          # 4 sets x 3 seeds
    python benchmarks/prompt_quality.py --model tiny --sets rt_sentiment --records 16 \\
        --eval-rows 4 --seeds 0                                  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
INITS = ("RANDOM", "TEXT", "LABELS")
VARIANTS = ("project", "project_fp32", "project_bf16", "baseline")
DEFAULT_VARIANTS = ["project", "project_fp32", "baseline"]
DTYPES = {"project_fp32": "float32", "project_bf16": "bfloat16"}

# name -> verbalizer and TEXT-init text (files: data/<name>_{train,test}.jsonl).
SETS = {
    "rt_sentiment": (
        "Review: {{input}}\nSentiment:",
        "Classify the sentiment of the movie review as positive or negative.",
    ),
    "tweet_sentiment": (
        "Tweet: {{input}}\nSentiment:",
        "Classify the sentiment of the tweet as positive or negative.",
    ),
    "sms_spam": (
        "Message: {{input}}\nSpam or ham:",
        "Classify the text message as spam or ham.",
    ),
    "question_type": (
        "Question: {{input}}\nAnswer type:",
        "Classify the question by the type of its answer: abbreviation, description, "
        "entity, person, location or number.",
    ),
}


def read_rows(name: str) -> list[dict]:
    """The records of a bundled data file (data/<name>)."""
    from caikit_tuning.data import read_records_file

    return read_records_file(ROOT / "data" / name)


def balanced(rows: list[dict], count: int) -> list[dict]:
    """Up to `count` rows taking the labels in turn, in file order within each label."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["output"], []).append(row)
    picked: list[dict] = []
    while len(picked) < count and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(picked) < count:
                picked.append(by_label[label].pop(0))
    return picked


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,!:;\"'").lower() if words else ""


def greedy_answer(peft_model, tokenizer, prompt: str, new_tokens: int = 3) -> str:
    """The greedy answer of `new_tokens` tokens: the soft prompt's vectors, then the
    prompt's token embeddings, through the base model with its cache. (peft's own cached
    `generate` gave other second tokens for a prompt-tuned model than full forward passes
    do; this gave what they give, on 30 of 30 reviews, in half the time.)"""
    import torch

    base = peft_model.get_base_model()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    soft = peft_model.get_prompt(batch_size=1).to(base.dtype)
    embeds = torch.cat([soft, base.get_input_embeddings()(ids)], dim=1)
    new: list[int] = []
    with torch.no_grad():
        out = base(inputs_embeds=embeds, use_cache=True)
        for _ in range(new_tokens):
            pick = int(out.logits[0, -1].argmax())
            if pick == tokenizer.eos_token_id:
                break
            new.append(pick)
            out = base(
                input_ids=torch.tensor([[pick]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return tokenizer.decode(new, skip_special_tokens=True)


def accuracy(peft_model, tokenizer, verbalizer: str, rows: list[dict]) -> float:
    """First-word accuracy of greedy 3-token answers."""
    peft_model.eval()
    right = sum(
        first_word(
            greedy_answer(peft_model, tokenizer, verbalizer.replace("{{input}}", row["input"]))
        )
        == row["output"]
        for row in rows
    )
    return right / len(rows)


def load_adapter(model_folder: str, adapter_folder: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_folder)


def run_project(job: dict, variant: str, init: str, seed: int) -> tuple[float, float]:
    """(accuracy, train() seconds)."""
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

    config = {"num_virtual_tokens": 20, "prompt_tuning_init_method": init}
    if init == "TEXT":
        config["prompt_tuning_init_text"] = job["init_text"]
    began = time.perf_counter()
    model = PeftPromptTuning.train(
        job["model"],
        DataStream.from_iterable([TrainGenerationRecord(**row) for row in job["train_rows"]]),
        TuningConfig(**config),
        verbalizer=job["verbalizer"],
        num_epochs=1,
        batch_size=8,
        learning_rate=job["learning_rate"] or None,
        max_source_length=128,
        max_target_length=8,
        seed=seed,
        torch_dtype=DTYPES.get(variant),
        silence_progress_bars=True,
    )
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        peft_model = load_adapter(job["model_folder"], folder)
        return accuracy(
            peft_model, model.base.tokenizer, job["verbalizer"], job["test_rows"]
        ), seconds


def run_baseline(job: dict, init: str, seed: int) -> tuple[float, float]:
    from peft_baseline import train_baseline  # next to this script

    run = train_baseline(
        {
            **job,
            "init": init,
            "num_virtual_tokens": 20,
            "max_source_length": 128,
            "max_target_length": 8,
            "batch_size": 8,
            "steps": len(job["train_rows"]) // 8,
            "seed": seed,
            "device": "cpu",
        }
    )
    score = accuracy(run.model, run.tokenizer, job["verbalizer"], job["test_rows"])
    return score, run.finished - run.loaded


def table(summary: dict) -> str:
    lr = summary["learning_rate"] or "the project's default"
    lines = [
        f"# Prompt-tuning accuracy on the bundled labelled sets: {summary['model']}",
        "",
        f"First {summary['records']} training records, 1 epoch, batch 8, learning rate {lr}, "
        f"20 virtual tokens; first-word accuracy of greedy answers on {summary['eval_rows']} "
        f"balanced held-out rows per set (the same PEFT evaluation for every variant); "
        f"seeds {summary['seeds']}. `project` is the default precision "
        f"({summary['default_precision']} here), the baseline is Trainer + peft in float32.",
        "",
        "| set | init | variant | accuracy per seed | median | train s (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary["cells"]:
        lines.append(
            f"| {row['set']} | {row['init']} | {row['variant']} | "
            f"{', '.join(f'{a:.2f}' for a in row['accuracy'])} | {row['median']:.2f} | "
            f"{row['train_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inits", nargs="+", default=["RANDOM"], choices=INITS)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument(
        "--learning-rate", type=float, default=0.03, help="0: the project's default"
    )
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    from caikit_tuning.training.devices import autocast_dtype

    cells = []
    with tempfile.TemporaryDirectory() as workdir:
        model, folder = resolve_model(args.model, Path(workdir))
        for name in args.sets:
            verbalizer, init_text = SETS[name]
            job = {
                "model": model,
                "model_folder": folder,
                "verbalizer": verbalizer,
                "init_text": init_text,
                "learning_rate": args.learning_rate,
                "train_rows": read_rows(f"{name}_train.jsonl")[: args.records],
                "test_rows": balanced(read_rows(f"{name}_test.jsonl"), args.eval_rows),
            }
            for init in args.inits:
                for variant in args.variants:
                    if variant == "baseline" and (init == "LABELS" or not args.learning_rate):
                        continue
                    scores, seconds = [], []
                    for seed in args.seeds:
                        if variant == "baseline":
                            score, took = run_baseline(job, init, seed)
                        else:
                            score, took = run_project(job, variant, init, seed)
                        scores.append(score)
                        seconds.append(took)
                        print(
                            f"{name} {init} {variant} seed {seed}: {score:.2f} ({took:.1f} s)",
                            flush=True,
                        )
                    cells.append(
                        {
                            "set": name,
                            "init": init,
                            "variant": variant,
                            "accuracy": scores,
                            "median": statistics.median(scores),
                            "train_s": statistics.median(seconds),
                        }
                    )
    dtype = autocast_dtype(torch.device("cpu"), torch.float32)
    summary = {
        "model": args.model,
        "records": args.records,
        "eval_rows": args.eval_rows,
        "seeds": args.seeds,
        "learning_rate": args.learning_rate,
        "default_precision": f"{dtype} autocast".replace("torch.", "") if dtype else "float32",
        "cells": cells,
    }
    stem = args.name or f"prompt_quality_{args.model}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{stem}.md").write_text(table(summary))
    print(table(summary))


if __name__ == "__main__":
    sys.exit(main())
