"""Serving and training on the same cores: how long a training job takes, and how many
REST requests the server answers meanwhile, for two OpenMP spin settings.

Starts the runtime from the shipped runtime_config.yaml (as examples/serve_and_tune.py
does), submits a PeftPromptTuning job for SmolLM2-135M over gRPC and keeps `--clients`
REST clients asking a served model for the sentiment of held-out reviews until the job
ends. Cases, alternating for `--rounds` rounds:

- `shipped`: the environment as given (the server picks its spin, its workers inherit it);
- `spin_N` for each N in `--spins`: `GOMP_SPINCOUNT=N` set for the server and its
  workers (300,000 is libgomp's default count, set explicitly so that the server's import
  does not choose for it).

    python benchmarks/serving_while_training.py --rounds 2 --spins 1000 10000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
RESULTS = ROOT / "benchmarks" / "results"


def spin_cases(spins: list[int]) -> dict[str, dict[str, str]]:
    return {"shipped": {}} | {f"spin_{n}": {"GOMP_SPINCOUNT": str(n)} for n in spins}


def run_case(
    case: str, env: dict, round_: int, args, folders: dict, served: str, records, rows
) -> dict:
    import serve_and_tune as demo

    from caikit_tuning.runtime.client import TuningClient
    from caikit_tuning.runtime.process import free_port

    saved = dict(os.environ)
    os.environ.pop("GOMP_SPINCOUNT", None)
    os.environ.update(env | folders)
    grpc_port, http_port = free_port(), free_port()
    log = Path(args.workdir) / f"server_{case}_{round_}.log"
    try:
        server = demo.start_server(grpc_port, http_port, log)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        client = TuningClient(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
        client.generate(served, rows[0]["input"], max_new_tokens=3)  # loaded before timing
        job = client.train_prompt_tuning(
            f"swt-{case}-{round_}",
            args.model,
            records=records,
            tuning_config={"num_virtual_tokens": 20},
            verbalizer=demo.VERBALIZER,
            num_epochs=1,
            batch_size=8,
            learning_rate=0.03,
            max_source_length=128,
            max_target_length=4,
        )
        answered = [0] * args.clients
        stop = threading.Event()

        def ask(index: int) -> None:
            k = index
            while not stop.is_set():
                client.generate(served, rows[k % len(rows)]["input"], max_new_tokens=3)
                answered[index] += 1
                k += args.clients

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(args.clients)]
        started = time.perf_counter()
        time.sleep(args.clients_after)
        for thread in threads:
            thread.start()
        try:
            final = client.wait(job, poll_seconds=1, timeout=args.give_up_seconds)
        except TimeoutError:
            final = client.cancel(job)
            final = {"state": f"not done after {args.give_up_seconds:.0f} s (cancelled)"}
        seconds = time.perf_counter() - started
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    result = {
        "case": case,
        "round": round_,
        "state": final["state"],
        "training_seconds": round(seconds, 1) if final["state"] == "COMPLETED" else None,
        "requests_per_second": round(sum(answered) / (seconds - args.clients_after), 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="SmolLM2-135M-Instruct",
        help='the bundled model, or "tiny" (a tiny llama built in --workdir, for smoke tests)',
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps at batch 8")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--give-up-seconds", type=float, default=240.0)
    parser.add_argument(
        "--clients-after",
        type=float,
        default=0.0,
        help="seconds after the job's submission the clients start (the job starts alone)",
    )
    parser.add_argument(
        "--spins", type=int, nargs="+", default=[1000, 300000], help="GOMP_SPINCOUNT cases"
    )
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--name", default="serving_while_training", help="results file stem")
    args = parser.parse_args()

    import caikit
    import serve_and_tune as demo

    from caikit_tuning import InContextLearning
    from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2
    from caikit_tuning.data import read_records_file

    os.chdir(ROOT)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    caikit.configure(str(ROOT / "runtime_config.yaml"))
    records = read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl")[: args.steps * 8]
    rows = read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl")[:400]
    folders = {}  # the shipped config's folders, or the workdir's for the tiny model
    if args.model == "tiny":
        from caikit_tuning.testing.tiny_models import build_tiny_llama

        work = Path(args.workdir).resolve()
        build_tiny_llama(work / "base" / "tiny", [r["input"] for r in records + rows])
        served_dir = work / "served"
        folders = {
            "BASE_MODELS_DIR": str(work / "base"),
            "RUNTIME_LOCAL_MODELS_DIR": str(served_dir),
            "RUNTIME_TRAINING_OUTPUT_DIR": str(served_dir),
        }
        caikit.configure(config_dict={"base_models_dir": str(work / "base")})
    elif args.model == NAME:
        prepare_smollm2(ROOT / caikit.get_config().base_models_dir)
        served_dir = ROOT / caikit.get_config().runtime.local_models_dir
    else:
        raise SystemExit(f'--model is {NAME} or "tiny", not {args.model!r}')
    served = "swt-zero-shot"
    InContextLearning.train(
        args.model, task_description=demo.DESCRIPTION, verbalizer=demo.VERBALIZER, device="cpu"
    ).save(str(served_dir / served))
    cases = spin_cases(args.spins)
    results = [
        run_case(case, env, round_, args, folders, served, records, rows)
        for round_ in range(args.rounds)
        for case, env in cases.items()
    ]
    lines = [
        "# Serving and training on the same cores",
        "",
        f"A {args.steps}-step PeftPromptTuning job ({args.model}, batch 8) submitted over gRPC"
        f" to a server started from runtime_config.yaml, while {args.clients} REST clients ask"
        f" a served model (from {args.clients_after:g} s after the submission); medians over"
        " the rounds.",
        "",
        "| case | training s per round | median | requests/s per round | median |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        runs = [r for r in results if r["case"] == case]
        seconds = [r["training_seconds"] or float("inf") for r in runs]
        rates = [r["requests_per_second"] for r in runs]
        lines.append(
            f"| {case} | {', '.join(map(str, seconds))} | {statistics.median(seconds)} "
            f"| {', '.join(map(str, rates))} | {statistics.median(rates)} |"
        )
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
