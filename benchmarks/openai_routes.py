"""The same concurrent load through the OpenAI route and the caikit route, side by side.

One server, one run: a TextGeneration model and a prompt-tuned model of the same base
take greedy requests of N new tokens (min = max, so every answer has the same length)
from 16 concurrent clients, round-robin over the two models, through
`POST /v1/completions` and through `POST /api/v1/task/text-generation`. The phases
alternate (caikit, OpenAI, caikit, ...) so the machine's drift hits both alike; both
use the same plain HTTP client, so what differs is only the server's route. Reported:
new tokens/s (median of the repeats), p50/p99 latency, and the ratio.

    python benchmarks/openai_routes.py                        # SmolLM2-135M-Instruct
    python benchmarks/openai_routes.py --model tiny --requests 16 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import base_models, run_threads  # noqa: E402  (next to this script)
from stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {
    "caikit": "/api/v1/task/text-generation",
    "openai": "/v1/completions",
}


def body(route: str, model: str, text: str, tokens: int) -> dict:
    if route == "openai":
        return {
            "model": model,
            "prompt": text,
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }
    return {
        "model_id": model,
        "inputs": text,
        "parameters": {"max_new_tokens": tokens, "min_new_tokens": tokens},
    }


def generated_tokens(route: str, answer: dict) -> int:
    if route == "openai":
        return answer["usage"]["completion_tokens"]
    return answer["generated_tokens"]


def load_phase(
    port: int, route: str, models: list[str], requests: int, clients: int, tokens: int
) -> dict:
    latencies: list[float] = []
    counts = {"tokens": 0, "errors": 0}
    lock = threading.Lock()
    jobs = list(range(requests))

    def worker():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if not jobs:
                    break
                index = jobs.pop()
            payload = json.dumps(
                body(
                    route,
                    models[index % len(models)],
                    f"request {index}: a gorgeous, moving film.",
                    tokens,
                )
            )
            began = time.perf_counter()
            try:
                connection.request(
                    "POST", ROUTES[route], payload, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                answer = json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(answer)
            except Exception:  # noqa: BLE001  (counted, reported)
                with lock:
                    counts["errors"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
                counts["tokens"] += generated_tokens(route, answer)
        connection.close()

    seconds = run_threads(worker, clients)
    return {
        "route": route,
        "errors": counts["errors"],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(counts["tokens"] / seconds, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3),
    }


def make_models(base_model: str, folder: Path) -> list[str]:
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TextGeneration, TrainGenerationRecord, TuningConfig

    TextGeneration.bootstrap(base_model).save(str(folder / "base"))
    rows = [
        TrainGenerationRecord(input="A gorgeous, moving film.", output="positive"),
        TrainGenerationRecord(input="A dull, lifeless mess.", output="negative"),
    ] * 4
    PeftPromptTuning.train(
        base_model,
        DataStream.from_iterable(rows),
        TuningConfig(num_virtual_tokens=20),
        verbalizer="Review: {{input}} Sentiment:",
        num_epochs=1,
        batch_size=8,
    ).save(str(folder / "prompt"))
    return ["base", "prompt"]


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit_tuning  # noqa: F401
    from caikit_tuning.runtime.process import RuntimeProcess

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base_dir, name = base_models(args.model, workdir)
        server = RuntimeProcess(workdir, base_dir, {"runtime": {"metrics": {"enabled": False}}})
        models = make_models(name, server.models)
        server.start(timeout=300, env={"OMP_NUM_THREADS": str(args.threads)})
        phases: dict[str, list[dict]] = {"caikit": [], "openai": []}
        try:
            for route in ROUTES:  # warm-up: load both models, touch both routes
                load_phase(server.http_port, route, models, 4, 2, 2)
            for _ in range(args.repeats):
                for route in ROUTES:
                    phases[route].append(
                        load_phase(
                            server.http_port,
                            route,
                            models,
                            args.requests,
                            args.clients,
                            args.new_tokens,
                        )
                    )
        finally:
            server.stop()

    def median(route: str, key: str) -> float:
        return round(statistics.median(phase[key] for phase in phases[route]), 3)

    summary = {
        "model": name,
        "requests_per_phase": args.requests,
        "clients": args.clients,
        "new_tokens_per_request": args.new_tokens,
        "threads": args.threads,
        "phases": phases,
        "tokens_per_second": {route: median(route, "tokens_per_second") for route in ROUTES},
        "errors": {route: sum(phase["errors"] for phase in phases[route]) for route in ROUTES},
    }
    summary["openai_over_caikit"] = round(
        summary["tokens_per_second"]["openai"] / summary["tokens_per_second"]["caikit"], 3
    )
    rows = [
        f"| {label} | {median(route, 'tokens_per_second')} | "
        f"{', '.join(str(p['tokens_per_second']) for p in phases[route])} | "
        f"{median(route, 'p50_latency_s')} | {median(route, 'p99_latency_s')} | {summary['errors'][route]} |"
        for label, route in (
            ("caikit `/api/v1/task/text-generation`", "caikit"),
            ("OpenAI `/v1/completions`", "openai"),
        )
    ]
    lines = [
        f"# The OpenAI route and the caikit route under the same load: {name}",
        "",
        f"{args.requests} greedy requests of {args.new_tokens} new tokens per phase from {args.clients} "
        f"concurrent clients over a TextGeneration model and a prompt-tuned model of the base, "
        f"{args.threads} threads, phases alternating, median of {args.repeats}. One server, one run.",
        "",
        "| route | tokens/s (median) | runs | p50 latency (s) | p99 latency (s) | errors |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"OpenAI / caikit throughput: **{summary['openai_over_caikit']}** (goal: within 5%).",
    ]
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"openai_routes_{name}"
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
