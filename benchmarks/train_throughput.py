"""Prompt-tuning training speed: caikit_tuning vs the loop a user would write instead.

One invocation runs, alternately and in fresh processes (so peak memory is each run's
own): (a) `PeftPromptTuning.train`, and (b) the baseline: `transformers.Trainer` with
its default settings, `peft.get_peft_model` with a `PromptTuningConfig`, and
`DataCollatorForSeq2Seq` per-batch padding in random order. Same model, records,
verbalizer, virtual tokens, batch size, learning rate and number of steps.

Reported per variant (median of --repeats runs) and as ratios project/baseline:
train tokens/s (real, unpadded tokens), fraction of processed positions that are
padding, peak RSS, seconds to the first optimizer step (from before the model load),
final training loss (mean of the last 10 steps), held-out loss (the same PEFT
evaluation for both), and useful FLOP/s (4 x parameters x real tokens / s: a forward
and an input-gradient backward) against the machine's torch.mm peak.

    python benchmarks/train_throughput.py --model SmolLM2-135M-Instruct --steps 50
    python benchmarks/train_throughput.py --model tiny --steps 20 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VERBALIZER = "Review: {{input}}\nIs this review positive or negative? Answer:"


# --------------------------------------------------------------------- shared


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def heldout_loss(peft_model, tokenizer, rows: list[dict], config: dict) -> float:
    """Mean token cross-entropy of the targets of `rows`, through a PEFT model."""
    import torch

    from caikit_tuning.data import Verbalizer, tokenize_examples

    verbalizer = Verbalizer.parse(config["verbalizer"])
    examples = tokenize_examples(
        tokenizer,
        [verbalizer.render(r) for r in rows],
        [r["output"] for r in rows],
        config["max_source_length"],
        config["max_target_length"],
    )
    peft_model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.source_ids + ex.target_ids])
            labels = torch.tensor([[-100] * len(ex.source_ids) + ex.target_ids])
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
            total += out.loss.item() * len(ex.target_ids)
            count += len(ex.target_ids)
    return total / count


PROMPT = {
    "num_virtual_tokens": 20,
    "init_text": "Classify the sentiment of the movie review as positive or negative.",
}

# What is trained: classification snippets (a one-word answer) or instruction-style
# answers of 100+ tokens. "long" answers each review with the reviews that follow it in
# the bundled file (real text, cut to --long-target-tokens): for speed, not for quality.
WORKLOADS = {
    "short": {"verbalizer": VERBALIZER, "max_target_length": 8},
    "long": {
        "verbalizer": "Review: {{input}}\nWrite more reviews like this one:",
        "max_target_length": 160,
    },
}


def workload_rows(rows: list[dict], workload: str, count: int) -> list[dict]:
    if workload == "short":
        return rows[:count]
    return [
        {"input": row["input"], "output": " ".join(r["input"] for r in rows[i + 1 : i + 9])}
        for i, row in enumerate(rows[:count])
    ]


# -------------------------------------------------------------------- workers


def run_project(config: dict) -> dict:
    import torch
    from caikit.core.data_model import DataStream
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from caikit_tuning import PeftPromptTuning, TuningConfig

    torch.set_num_threads(config["threads"])
    rows = config["train_rows"]
    started = time.perf_counter()
    model = PeftPromptTuning.train(
        base_model=config["model"],
        train_stream=DataStream.from_iterable(rows),
        tuning_config=TuningConfig(
            num_virtual_tokens=config["num_virtual_tokens"],
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text=config["init_text"],
        ),
        verbalizer=config["verbalizer"],
        num_epochs=1,
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        max_source_length=config["max_source_length"],
        max_target_length=config["max_target_length"],
        seed=config["seed"],
        silence_progress_bars=True,
        torch_dtype=config.get("torch_dtype"),
        optimization={"torch_compile": config.get("torch_compile", False)},
        device=config["device"],
    )
    train_call = time.perf_counter() - started
    rss = peak_rss_mb()  # before the evaluation below loads a second copy of the model
    gpu = peak_gpu_mb()
    info = model.training_config
    losses = [e["loss"] for e in model.training_logs if "loss" in e]
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        base = AutoModelForCausalLM.from_pretrained(config["model_folder"], dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, folder)
        loss = heldout_loss(peft_model, model.base.tokenizer, config["eval_rows"], config)
    return {
        # The whole train() call: model load, tokenizing, the loop, the summary.
        "call_seconds": train_call,
        "train_seconds": info["seconds"],
        "real_tokens": info["real_tokens"],
        "padded_tokens": info["padded_tokens"],
        # train() = set-up (load, tokenize) + the loop; the first step ends inside the loop.
        "wall_seconds_to_first_step": train_call - info["seconds"] + info["seconds_to_first_step"],
        "steps": info["steps"],
        "final_loss": statistics.mean(losses[-10:]),
        "heldout_loss": loss,
        "peak_rss_mb": rss,
        "peak_gpu_mb": gpu,
        "parameters": sum(p.numel() for p in model.base.model.parameters()),
    }


def run_baseline(config: dict) -> dict:
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(config["threads"])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(config["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(config["model_folder"], dtype=torch.float32)
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config["num_virtual_tokens"],
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=config["init_text"],
        tokenizer_name_or_path=config["model_folder"],
    )
    # The whole call is timed from here: the model load is left out of the baseline's.
    loaded = time.perf_counter()
    model = get_peft_model(model, peft_config)

    def encode(row: dict) -> dict:
        source = tokenizer(config["verbalizer"].replace("{{input}}", row["input"]))["input_ids"]
        source = source[-config["max_source_length"] :]
        target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        target = target[: config["max_target_length"] - 1] + [tokenizer.eos_token_id]
        return {
            "input_ids": source + target,
            "attention_mask": [1] * (len(source) + len(target)),
            "labels": [-100] * len(source) + target,
        }

    dataset = [encode(row) for row in config["train_rows"]]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    counts = {"real": 0, "padded": 0}

    def counting_collator(features):
        batch = collator(features)
        real = int(batch["attention_mask"].sum())
        counts["real"] += real
        counts["padded"] += batch["attention_mask"].numel() - real
        return batch

    timing: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            timing["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step", time.perf_counter())

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            max_steps=config["steps"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=config["device"] == "cpu",
            # On a GPU, the mixed precision a user would ask Trainer for.
            bf16=config["device"] != "cpu",
            seed=config["seed"],
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=dataset,
            data_collator=counting_collator,
            callbacks=[Timer()],
        )
        trainer.train()
    finished = time.perf_counter()
    seconds = finished - timing["begin"]
    rss, gpu = peak_rss_mb(), peak_gpu_mb()
    model.to("cpu")  # the held-out loss below runs on the CPU, as the project's does
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "call_seconds": finished - loaded,
        "train_seconds": seconds,
        "real_tokens": counts["real"],
        "padded_tokens": counts["padded"],
        "wall_seconds_to_first_step": timing["first_step"] - started,
        "steps": trainer.state.global_step,
        "final_loss": statistics.mean(losses[-10:]),
        "heldout_loss": heldout_loss(model, tokenizer, config["eval_rows"], config),
        "peak_rss_mb": rss,
        "peak_gpu_mb": gpu,
        "parameters": sum(p.numel() for p in model.get_base_model().parameters()),
    }


WORKERS = {"project": run_project, "baseline": run_baseline}

from train_report import markdown, summarize  # noqa: E402  (next to this script)

# ----------------------------------------------------------------- orchestration


def matmul_peak_gflops(threads: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    size = 2048 if device == "cpu" else 8192
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        torch.mm(a, b)
        best = 0.0
        for _ in range(5):
            sync()
            begin = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = max(best, 2 * size**3 / (time.perf_counter() - begin) / 1e9)
        peaks[str(dtype).removeprefix("torch.")] = round(best, 1)
    return peaks


def resolve_model(name: str, workdir: Path) -> tuple[str, str]:
    """(base_model argument, model folder); "tiny" builds a tiny llama offline."""
    import caikit

    import caikit_tuning  # noqa: F401
    from caikit_tuning.data import read_records_file

    if name == "tiny":
        from caikit_tuning.testing.tiny_models import build_tiny_llama

        rows = read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl")
        folder = build_tiny_llama(workdir / "tiny-llama", [r["input"] for r in rows[:1500]])
        return str(folder), str(folder)
    folder = Path(caikit.get_config().base_models_dir) / name
    if not folder.is_dir():
        from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2

        if name != NAME:
            raise SystemExit(f"no model folder {folder}")
        prepare_smollm2(folder.parent)
    return name, str(folder.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help='a name under base_models_dir, or "tiny"'
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--max-source-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    parser.add_argument(
        "--torch-dtype",
        default=None,
        help='caikit_tuning\'s torch_dtype: unset = bf16 autocast where native; "float32" = pure fp32',
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="caikit_tuning's optimization.torch_compile (the baseline stays eager)",
    )
    parser.add_argument("--name", help="results file stem (default: from the model)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        config = json.loads(Path(args.config_file).read_text())
        print("RESULT " + json.dumps(WORKERS[args.worker](config)), flush=True)
        return

    # The workers' environment as the user gave it: importing the project sets OpenMP
    # defaults (caikit_tuning/__init__) that the baseline's worker must not inherit.
    user_env = dict(os.environ)
    # Only here, in the orchestrator: the baseline's worker must not import the project.
    from caikit_tuning.data import read_records_file

    with tempfile.TemporaryDirectory() as workdir:
        model, folder = resolve_model(args.model, Path(workdir))
        count = args.steps * args.batch_size
        train = workload_rows(
            read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl"), args.workload, count
        )
        test = workload_rows(
            read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl"),
            args.workload,
            args.eval_rows,
        )
        config = {
            "model": model,
            "model_folder": folder,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_source_length": args.max_source_length,
            "threads": args.threads,
            "repeats": args.repeats,
            "seed": 42,
            "torch_dtype": args.torch_dtype,
            "torch_compile": args.torch_compile,
            "workload": args.workload,
            "device": args.device,
            **WORKLOADS[args.workload],
            **PROMPT,
            "train_rows": train,
            "eval_rows": test,
        }
        config_file = Path(workdir) / "config.json"
        config_file.write_text(json.dumps(config))
        runs: dict[str, list[dict]] = {"project": [], "baseline": []}
        env = {
            **user_env,
            "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        for repeat in range(args.repeats):
            for variant in ("project", "baseline"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        variant,
                        "--config-file",
                        str(config_file),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode != 0 or not lines:
                    raise SystemExit(f"{variant} run failed:\n{out.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                runs[variant].append(result)
                print(
                    f"repeat {repeat + 1} {variant:8}: {result['real_tokens'] / result['train_seconds']:7.1f} tokens/s, "
                    f"loss {result['final_loss']:.4f}, held-out {result['heldout_loss']:.4f}, "
                    f"rss {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        summary = summarize(runs, matmul_peak_gflops(args.threads, args.device), config)
    stem = args.name or f"train_throughput_{Path(args.model).name}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary, f"Prompt-tuning training throughput: {Path(args.model).name}")
    (results / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
