"""Serving many prompt-tuned models of one base: concurrency and memory, through REST.

In one run against one server: (a) the same requests sent one by one, (b) sent by 16
concurrent clients, over 4 prompt-tuned models of the same base model; reported as new
tokens/s and p50/p99 latency. Then the server's RSS with 1 and with 50 prompt models
loaded (each loaded by a request to it).

    python benchmarks/serving_batching.py                       # SmolLM2-135M-Instruct
    python benchmarks/serving_batching.py --model tiny --requests 32 --models 10   # smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from harness import base_models, run_threads  # noqa: E402  (next to this script)
from stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_prompt_models(base_model: str, folder: Path, count: int) -> list[str]:
    """`count` prompt models of `base_model`: one short training, then copies with
    different prompt vectors (what matters here is how many there are, not quality)."""
    import torch
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

    rows = [
        TrainGenerationRecord(input="A gorgeous, moving film.", output="positive"),
        TrainGenerationRecord(input="A dull, lifeless mess.", output="negative"),
    ] * 4
    model = PeftPromptTuning.train(
        base_model,
        DataStream.from_iterable(rows),
        TuningConfig(num_virtual_tokens=20),
        verbalizer="Review: {{input}} Sentiment:",
        num_epochs=1,
        batch_size=8,
    )
    names = []
    for index in range(count):
        with torch.no_grad():
            model.prompt.weight.add_(0.01 * torch.randn_like(model.prompt.weight))
        name = f"prompt-{index:03d}"
        model.save(str(folder / name))
        names.append(name)
    return names


def load_phase(client, models: list[str], requests: int, clients: int, tokens: int) -> dict:
    """Send `requests` greedy requests round-robin over `models` from `clients` threads."""
    latencies: list[float] = []
    generated = [0]
    errors = [0]
    lock = threading.Lock()
    jobs = list(range(requests))

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                index = jobs.pop()
            began = time.perf_counter()
            try:
                out = client.generate(
                    models[index % len(models)],
                    f"Review: request {index} was a gorgeous, moving film.",
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                )
            except Exception:  # noqa: BLE001  (counted, reported)
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
                generated[0] += out["generated_tokens"]

    seconds = run_threads(worker, clients)
    return {
        "clients": clients,
        "requests": requests,
        "errors": errors[0],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(generated[0] / seconds, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3),
    }


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help='a name under base_models_dir, or "tiny"'
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--models", type=int, default=50, help="prompt models for the memory check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit_tuning  # noqa: F401
    from caikit_tuning.runtime.process import RuntimeProcess

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base_dir, name = base_models(args.model, workdir)
        server = RuntimeProcess(
            workdir,
            base_dir,
            {"runtime": {"metrics": {"enabled": False}, "lazy_load_poll_period_seconds": 3600}},
        )
        models = make_prompt_models(name, server.models, max(args.models, 4))
        server.start(timeout=300, env={"OMP_NUM_THREADS": str(args.threads)})
        try:
            client = server.client()
            client.generate(models[0], "warm-up", max_new_tokens=2)
            rss_one = rss_mb(server.process.pid)
            for model in models[:4]:
                client.generate(model, "warm-up", max_new_tokens=2)
            sequential = load_phase(client, models[:4], args.requests, 1, args.new_tokens)
            concurrent = load_phase(
                client, models[:4], args.requests, args.clients, args.new_tokens
            )
            for model in models:
                client.generate(model, "load", max_new_tokens=1)
            rss_all = rss_mb(server.process.pid)
        finally:
            server.stop()

    summary = {
        "model": name,
        "new_tokens_per_request": args.new_tokens,
        "threads": args.threads,
        "sequential": sequential,
        "concurrent": concurrent,
        "throughput_ratio": round(
            concurrent["tokens_per_second"] / sequential["tokens_per_second"], 2
        ),
        "rss_mb_one_prompt_model": round(rss_one, 1),
        f"rss_mb_{len(models)}_prompt_models": round(rss_all, 1),
        "memory_ratio": round(rss_all / rss_one, 3),
    }
    lines = [
        f"# Serving prompt models of one base: {name}",
        "",
        f"{args.requests} greedy requests of {args.new_tokens} new tokens over 4 prompt models, REST, "
        f"{args.threads} threads. One server, one run.",
        "",
        "| load | tokens/s | p50 latency (s) | p99 latency (s) | errors |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {label} | {phase['tokens_per_second']} | {phase['p50_latency_s']} | {phase['p99_latency_s']} | {phase['errors']} |"
            for label, phase in (
                ("sequential (1 client)", sequential),
                (f"concurrent ({args.clients} clients)", concurrent),
            )
        ),
        "",
        f"Concurrent / sequential throughput: **{summary['throughput_ratio']}x**.",
        "",
        f"Server RSS: {summary['rss_mb_one_prompt_model']} MB with 1 prompt model loaded, "
        f"{round(rss_all, 1)} MB with {len(models)}: **{summary['memory_ratio']}x**.",
        "",
    ]
    stem = args.name or f"serving_batching_{name}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
