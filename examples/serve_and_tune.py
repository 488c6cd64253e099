"""The main job: serve caikit_tuning, prompt-tune SmolLM2-135M over gRPC, query it over REST.

1. starts the runtime (runtime_config.yaml) on loopback, on free ports;
2. submits a PeftPromptTuning job for SmolLM2-135M-Instruct on the bundled Rotten
   Tomatoes reviews over gRPC, and shows its progress;
3. asks the untuned model (zero-shot) and the trained model for the sentiment of
   held-out reviews over REST and prints the accuracy of both and a few predictions;
4. stops the server.

Run from the repository root: python examples/serve_and_tune.py
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from caikit_tuning.data import read_records_file
from caikit_tuning.modules.evaluation import balanced
from caikit_tuning.runtime.process import free_port

ROOT = Path(__file__).resolve().parent.parent
VERBALIZER = "Review: {{input}} Sentiment:"
DESCRIPTION = "Classify the sentiment of the movie review as positive or negative."
LABELS = ["positive", "negative"]


def accuracy(client, model_id: str, rows: list[dict], show: int = 0) -> float:
    """REST predictions for `rows` (8 at a time, so the server batches them), each
    mapped to a label by the server (labels=positive/negative, `contains`)."""

    def predict(row: dict) -> str:
        answer = client.generate(
            model_id, row["input"], max_new_tokens=3, labels=LABELS, label_fallback="?"
        )
        return answer["generated_text"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        predictions = list(pool.map(predict, rows))
    for row, predicted in list(zip(rows, predictions, strict=True))[:show]:
        print(f"  {row['output']:>8} <- {predicted:9} {row['input'][:64]}")
    return sum(p == r["output"] for p, r in zip(predictions, rows, strict=True)) / len(rows)


def start_server(grpc_port: int, http_port: int, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "RUNTIME_GRPC_PORT": str(grpc_port),
        "RUNTIME_HTTP_PORT": str(http_port),
        "RUNTIME_METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "warning",
    }
    log = open(log_path, "w")  # noqa: SIM115  (closed with the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "caikit_tuning.runtime", "--config", "runtime_config.yaml"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while "runtime ready" not in log_path.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {log_path}")
        time.sleep(0.2)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps at batch 8")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--model-name", default="rt-sentiment")
    args = parser.parse_args()

    import caikit

    from caikit_tuning import InContextLearning
    from caikit_tuning.bundled.smollm2 import NAME, prepare_smollm2
    from caikit_tuning.runtime.client import TuningClient

    caikit.configure(str(ROOT / "runtime_config.yaml"))
    prepare_smollm2(ROOT / caikit.get_config().base_models_dir)
    # The untuned model, for "before": zero-shot with the same description and verbalizer.
    zero_shot = f"{args.model_name}-zero-shot"
    InContextLearning.train(
        NAME, task_description=DESCRIPTION, verbalizer=VERBALIZER, device="cpu"
    ).save(str(ROOT / caikit.get_config().runtime.local_models_dir / zero_shot))
    records = read_records_file(ROOT / "data" / "rt_sentiment_train.jsonl")[: args.steps * 8]
    test_rows = balanced(
        read_records_file(ROOT / "data" / "rt_sentiment_test.jsonl"), args.eval_rows
    )

    grpc_port, http_port = free_port(), free_port()
    log_path = ROOT / "models" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    server = start_server(grpc_port, http_port, log_path)
    print(
        f"runtime up on 127.0.0.1 (gRPC {grpc_port}, HTTP {http_port}) in {time.perf_counter() - started:.0f}s"
    )
    try:
        client = TuningClient(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
        before = accuracy(client, zero_shot, test_rows)
        print(
            f"before tuning (zero-shot, REST): accuracy {before:.3f} on {len(test_rows)} held-out reviews"
        )
        training_id = client.train_prompt_tuning(
            args.model_name,
            NAME,
            records=records,
            tuning_config={
                "num_virtual_tokens": 20,
                "prompt_tuning_init_method": "TEXT",
                "prompt_tuning_init_text": DESCRIPTION,
            },
            verbalizer=VERBALIZER,
            num_epochs=1,
            batch_size=8,
            learning_rate=0.03,
            max_source_length=128,
            max_target_length=4,
        )
        print(f"submitted training {training_id} ({len(records)} records) over gRPC")
        shown = set()

        def show(status: dict) -> None:
            for reason in status.get("reasons", []):
                if reason not in shown and status.get("state") == "RUNNING":
                    shown.add(reason)
                    print(f"  {reason}", flush=True)

        final = client.wait(training_id, poll_seconds=2, on_status=show)
        if final["state"] != "COMPLETED":
            raise SystemExit(f"training ended {final['state']}: {final.get('reasons')}")
        print(f"training COMPLETED in {time.perf_counter() - started:.0f}s")

        after = accuracy(client, args.model_name, test_rows, show=5)
        print(
            f"after tuning (REST): accuracy {after:.3f} on {len(test_rows)} held-out reviews (before: {before:.3f})"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        print(f"server stopped; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
