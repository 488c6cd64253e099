"""Where a prompt-tuning step's time goes, on the training benchmark's workloads.

Runs `PeftPromptTuning.train` with the CPU profiler over its training loop (model load
and tokenizing left out) and reports, per optimizer step: wall time, time in torch
operators by kind (self time: matrix products, attention, casts and copies, other
element-wise work, the optimizer), and the rest, which is Python and dispatch outside
any operator. Results go to benchmarks/results/step_profile_<workload>.{json,md}.

    python benchmarks/step_profile.py --workload short --steps 12
    python benchmarks/step_profile.py --model tiny --steps 2 --results-dir /tmp/x  # smoke
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import PROMPT, WORKLOADS, resolve_model, train_project, workload_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Operator kinds by name (self time). Checked in order; the first match wins.
KINDS = [
    ("matrix products", r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)$|mkldnn"),
    ("attention kernels", r"scaled_dot_product|flash_attention|_efficient_attention"),
    (
        "casts and copies",
        r"aten::(copy_|_to_copy|to|clone|contiguous|cat|stack|index_select|slice|narrow|split|transpose|view|reshape|expand|permute|t|unsqueeze|squeeze|as_strided|select|_unsafe_view|empty.*|zeros.*|fill_|zero_)$",
    ),
    ("optimizer and clipping", r"adam|_foreach|norm$|clip|linalg_vector_norm"),
    ("loss", r"log_softmax|nll_loss|cross_entropy|logsumexp"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other operators (element-wise, norms, activations)"


def profile(args) -> dict:
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity

    from caikit_tuning.data import read_records_file
    from caikit_tuning.training import loop

    captured: dict = {}
    original = loop._Run.execute

    def execute(self):
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            began = time.perf_counter()
            result = original(self)
            captured["wall"] = time.perf_counter() - began
        captured["profile"] = prof
        return result

    loop._Run.execute = execute
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory() as workdir:
        model_name, _ = resolve_model(args.model, Path(workdir))
        rows = workload_rows(
            read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl"),
            args.workload,
            args.steps * 8,
        )
        model = train_project(
            {
                "model": model_name,
                **PROMPT,
                **workload,
                "train_rows": rows,
                "batch_size": 8,
                "learning_rate": 0.03,
                "max_source_length": 128,
                "seed": 42,
                "device": "cpu",
            }
        )
    loop._Run.execute = original
    info = model.training_config
    steps = info["steps"]
    by_kind: dict[str, float] = {}
    top = []
    total_ops = 0.0
    for event in captured["profile"].key_averages():
        seconds = event.self_cpu_time_total / 1e6
        total_ops += seconds
        kind = kind_of(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
        top.append((seconds, event.key, event.count))
    top.sort(reverse=True)
    wall = captured["wall"]
    return {
        "model": args.model,
        "workload": args.workload,
        "steps": steps,
        "threads": args.threads,
        "real_tokens_per_step": info["real_tokens"] / steps,
        "padded_tokens_per_step": info["padded_tokens"] / steps,
        "wall_ms_per_step": 1000 * wall / steps,
        "kinds_ms_per_step": {
            **{k: 1000 * v / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "outside operators (Python, dispatch, profiler)": 1000
            * max(0.0, wall - total_ops)
            / steps,
        },
        "top_operators": [
            {"name": name, "ms_per_step": 1000 * s / steps, "calls_per_step": count / steps}
            for s, name, count in top[:15]
        ],
    }


def markdown(summary: dict) -> str:
    wall = summary["wall_ms_per_step"]
    lines = [
        f"# Where a prompt-tuning step goes: {summary['model']}, {summary['workload']} workload",
        "",
        f"{summary['steps']} steps of batch 8 ({summary['real_tokens_per_step']:.0f} real and "
        f"{summary['padded_tokens_per_step']:.0f} padded tokens a step), {summary['threads']} "
        f"threads, under the CPU profiler (which adds its own cost): {wall:.0f} ms a step. "
        "Where the LM head is fused with the loss (training/linear_cross_entropy.py), its "
        "matrix products count as matrix products and its softmax as element-wise work, so "
        "`loss` keeps only what runs unfused.",
        "",
        "| where | ms per step | share |",
        "| --- | --- | --- |",
        *(
            f"| {kind} | {ms:.1f} | {ms / wall:.0%} |"
            for kind, ms in summary["kinds_ms_per_step"].items()
        ),
        "",
        "| operator (self time) | ms per step | calls per step |",
        "| --- | --- | --- |",
        *(
            f"| `{op['name']}` | {op['ms_per_step']:.1f} | {op['calls_per_step']:.0f} |"
            for op in summary["top_operators"]
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    summary = profile(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"step_profile_{args.workload}"
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
