"""A bounded load test of a caikit_tuning server on loopback: inference over REST and
gRPC at a fixed concurrency, then training jobs submitted faster than they run.

Reports, per transport: requests, concurrency, throughput (requests/s and new tokens/s),
p50/p99 latency and the error count (goal: zero); for training: jobs submitted, how
many were queued at once, and how many completed. It starts and stops its own server
and stops by itself.

    python benchmarks/load_test.py                          # 2,000 requests at concurrency 32
    python benchmarks/load_test.py --requests 200 --jobs 3  # CI-sized
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from harness import run_threads  # noqa: E402  (next to this script)
from stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def hammer(call, requests: int, concurrency: int) -> dict:
    latencies, tokens, errors = [], [0], []
    lock = threading.Lock()
    remaining = [requests]

    def worker():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                index = remaining[0]
            began = time.perf_counter()
            try:
                generated = call(index)
            except Exception as err:  # noqa: BLE001  (counted and reported)
                with lock:
                    errors.append(repr(err)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens[0] += generated

    seconds = run_threads(worker, concurrency)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "requests_per_second": round(requests / seconds, 1),
        "tokens_per_second": round(tokens[0] / seconds, 1),
        "p50_latency_s": round(percentile(latencies, 0.5), 4),
        "p99_latency_s": round(percentile(latencies, 0.99), 4),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def training_burst(client, jobs: int) -> dict:
    """Submit `jobs` small jobs at once (one CPU slot): they queue and all complete."""
    records = [
        {"input": "a fine film", "output": "positive"},
        {"input": "a dull mess", "output": "negative"},
    ] * 4
    ids = [
        client.train_prompt_tuning(
            f"burst-{i}", "tiny", records=records, num_epochs=2, batch_size=4
        )
        for i in range(jobs)
    ]
    most_queued = 0
    began = time.perf_counter()
    while True:
        states = [client.training_status(i)["state"] for i in ids]
        most_queued = max(most_queued, states.count("QUEUED"))
        if all(s in ("COMPLETED", "ERRORED", "CANCELED") for s in states):
            break
        time.sleep(0.2)
    return {
        "jobs": jobs,
        "most_queued_at_once": most_queued,
        "completed": states.count("COMPLETED"),
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--name", default="load_test")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit_tuning  # noqa: F401
    from caikit_tuning import TextGeneration
    from caikit_tuning.runtime.process import RuntimeProcess
    from caikit_tuning.testing.tiny_models import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_tiny_llama(
            workdir / "base" / "tiny", ["a fine film", "a dull mess", "the story"] * 50
        )
        server = RuntimeProcess(
            workdir, workdir / "base", {"runtime": {"metrics": {"enabled": False}}}
        )
        TextGeneration.bootstrap(str(workdir / "base" / "tiny")).save(str(server.models / "base"))
        server.start()
        try:
            client = server.client()
            n = args.new_tokens

            def rest(i):
                return client.generate("base", f"request {i}", max_new_tokens=n, min_new_tokens=n)[
                    "generated_tokens"
                ]

            def over_grpc(i):
                return int(
                    client.generate_grpc(
                        "base", f"request {i}", max_new_tokens=n, min_new_tokens=n
                    )["generated_tokens"]
                )

            rest(0)
            summary = {
                "model": "tiny llama (2 layers, hidden 48)",
                "new_tokens_per_request": n,
                "rest": hammer(rest, args.requests, args.concurrency),
                "grpc": hammer(over_grpc, args.requests, args.concurrency),
                "training": training_burst(client, args.jobs),
            }
        finally:
            server.stop()

    rows = [
        f"| {name} | {r['requests']} | {r['concurrency']} | {r['requests_per_second']} | {r['tokens_per_second']} "
        f"| {r['p50_latency_s']} | {r['p99_latency_s']} | {r['errors']} |"
        for name, r in (("REST", summary["rest"]), ("gRPC", summary["grpc"]))
    ]
    t = summary["training"]
    lines = [
        "# Load test (loopback, tiny model)",
        "",
        "| transport | requests | concurrency | requests/s | tokens/s | p50 (s) | p99 (s) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Training: {t['jobs']} jobs submitted at once on one CPU slot; up to {t['most_queued_at_once']} "
        f"queued at a time; {t['completed']} completed in {t['seconds']} s.",
        "",
    ]
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
