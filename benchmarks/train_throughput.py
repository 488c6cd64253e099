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
    python benchmarks/train_throughput.py --workload short long --steps 20 10 --repeats 2
    python benchmarks/train_throughput.py --model tiny --steps 20 --repeats 1   # smoke
    python benchmarks/train_throughput.py --workload long --steps 10 --against-revision HEAD~1

With --against-revision, the baseline is this project at that git revision (checked out
in a temporary worktree and imported from there), run alternately with the working
tree's: an A/B of a change on one machine in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


def train_project(config: dict):
    """`PeftPromptTuning.train` on the benchmark's job: the trained module."""
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TuningConfig

    return PeftPromptTuning.train(
        base_model=config["model"],
        train_stream=DataStream.from_iterable(config["train_rows"]),
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


def run_project(config: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import caikit_tuning

    torch.set_num_threads(config["threads"])
    started = time.perf_counter()
    model = train_project(config)
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
        "source": str(Path(caikit_tuning.__file__).resolve().parent.parent),
    }


def run_baseline(config: dict) -> dict:
    import torch
    from peft_baseline import train_baseline  # next to this script

    torch.set_num_threads(config["threads"])
    started = time.perf_counter()
    run = train_baseline(config)
    rss, gpu = peak_rss_mb(), peak_gpu_mb()
    run.model.to("cpu")  # the held-out loss below runs on the CPU, as the project's does
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    return {
        # The whole call is timed from after the model load: the baseline's load is left out.
        "call_seconds": run.finished - run.loaded,
        "train_seconds": run.finished - run.begin,
        "real_tokens": run.tokens["real"],
        "padded_tokens": run.tokens["padded"],
        "wall_seconds_to_first_step": run.first_step - started,
        "steps": run.trainer.state.global_step,
        "final_loss": statistics.mean(losses[-10:]),
        "heldout_loss": heldout_loss(run.model, run.tokenizer, config["eval_rows"], config),
        "peak_rss_mb": rss,
        "peak_gpu_mb": gpu,
        "parameters": sum(p.numel() for p in run.model.get_base_model().parameters()),
    }


WORKERS = {"project": run_project, "baseline": run_baseline}

from train_report import markdown, pairs_text, summarize  # noqa: E402  (next to this script)

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
    folder = (ROOT / caikit.get_config().base_models_dir / name).resolve()
    if not folder.is_dir():
        from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2

        if name != NAME:
            raise SystemExit(f"no model folder {folder}")
        prepare_smollm2(folder.parent)
    # The configured folder is relative to the repository, not to where this runs.
    caikit.configure(config_dict={"base_models_dir": str(folder.parent)})
    return name, str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help='a name under base_models_dir, or "tiny"'
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[50],
        help="optimizer steps, one for all or per workload",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.03)
    parser.add_argument("--max-source-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument(
        "--workload",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=["short"],
        help="one or more, run in turn",
    )
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
    parser.add_argument(
        "--against-revision",
        help="a git revision of this project to run as the baseline instead of Trainer + peft",
    )
    parser.add_argument("--name", help="results file stem (default: from the model and workload)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        config = json.loads(Path(args.config_file).read_text())
        print("RESULT " + json.dumps(WORKERS[args.worker](config)), flush=True)
        return

    if len(args.steps) not in (1, len(args.workload)):
        raise SystemExit("--steps takes one number, or one per --workload")
    steps = args.steps * len(args.workload) if len(args.steps) == 1 else args.steps
    summaries = {w: measure(args, w, n) for w, n in zip(args.workload, steps, strict=True)}
    if len(summaries) > 1:
        table = overview(summaries, Path(args.model).name)
        stem = f"{args.name or 'train_throughput'}_workloads_{Path(args.model).name}"
        (Path(args.results_dir) / f"{stem}.md").write_text(table)
        print(table)


def measure(args, workload: str, steps: int) -> dict:
    """Run project and baseline alternately on one workload; write and return the summary."""
    # The workers' environment as the user gave it: importing the project sets OpenMP
    # defaults (caikit_tuning/__init__) that the baseline's worker must not inherit.
    user_env = dict(os.environ)
    # Only here, in the orchestrator: the baseline's worker must not import the project.
    from caikit_tuning.data import read_records_file

    with tempfile.TemporaryDirectory() as workdir, _revision(args.against_revision) as revision:
        model, folder = resolve_model(args.model, Path(workdir))
        count = steps * args.batch_size
        train = workload_rows(
            read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl"), workload, count
        )
        test = workload_rows(
            read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl"), workload, args.eval_rows
        )
        config = {
            "model": model,
            "model_folder": folder,
            "steps": steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_source_length": args.max_source_length,
            "threads": args.threads,
            "repeats": args.repeats,
            "seed": 42,
            "torch_dtype": args.torch_dtype,
            "torch_compile": args.torch_compile,
            "workload": workload,
            "device": args.device,
            "against_revision": revision and revision.name,
            # Both variants' workers inherit it (an allocator such as tcmalloc).
            "ld_preload": user_env.get("LD_PRELOAD"),
            **WORKLOADS[workload],
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
                at_revision = revision is not None and variant == "baseline"
                worker, worker_env = variant, env
                if at_revision:
                    worker, worker_env = "project", {**env, "PYTHONPATH": str(revision.path)}
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    worker,
                    "--config-file",
                    str(config_file),
                ]
                out = subprocess.run(
                    command, capture_output=True, text=True, env=worker_env, cwd=ROOT
                )
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode != 0 or not lines:
                    raise SystemExit(f"{variant} run failed:\n{out.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                if at_revision and result["source"] != str(revision.path):
                    raise SystemExit(f"the revision's run imported {result['source']}")
                runs[variant].append(result)
                print(
                    f"{workload} repeat {repeat + 1} {variant:8}: "
                    f"{result['real_tokens'] / result['train_seconds']:7.1f} tokens/s, "
                    f"call {result['call_seconds']:.1f} s, loss {result['final_loss']:.4f}, "
                    f"held-out {result['heldout_loss']:.4f}, rss {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        summary = summarize(runs, matmul_peak_gflops(args.threads, args.device), config)
    stem = args.name or f"train_throughput_{Path(args.model).name}"
    if len(args.workload) > 1 or workload != "short":
        stem = f"{args.name or 'train_throughput'}_{workload}_{Path(args.model).name}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary, f"Prompt-tuning training throughput: {Path(args.model).name}")
    (results / f"{stem}.md").write_text(table)
    print(table)
    return summary


@dataclasses.dataclass(frozen=True)
class _Revision:
    name: str  # the short commit
    path: Path  # its worktree


@contextlib.contextmanager
def _revision(revision: str | None):
    """A temporary git worktree of this project at `revision` (None: nothing)."""
    if revision is None:
        yield None
        return
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if commit.returncode != 0:
        raise SystemExit(f"--against-revision: no commit {revision!r} here: {commit.stderr}")
    with tempfile.TemporaryDirectory() as parent:
        path = Path(parent).resolve() / "revision"
        subprocess.run(
            [*git, "worktree", "add", "--detach", str(path), commit.stdout.strip()],
            check=True,
            capture_output=True,
        )
        try:
            yield _Revision(commit.stdout.strip(), path)
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)


def overview(summaries: dict[str, dict], model: str) -> str:
    """One line per workload of one invocation: the whole call and the steady state."""
    lines = [
        f"# Every workload in one run: {model}",
        "",
        "| workload | steps | whole train() call, s (project / baseline) | speed-up | pairs | steady tokens/s (project / baseline) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, s in summaries.items():
        p, b = s["project"], s["baseline"]
        lines.append(
            f"| {workload} | {s['config']['steps']} | {p['call_seconds']} / {b['call_seconds']} | "
            f"{b['call_seconds'] / p['call_seconds']:.2f}x | "
            f"{pairs_text(s)} | {p['tokens_per_second']} / "
            f"{b['tokens_per_second']} | {p['tokens_per_second'] / b['tokens_per_second']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
