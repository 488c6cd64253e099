"""Soak test: minutes of mixed REST + gRPC traffic over two models with training jobs
running, first clean, then with misbehaving clients alongside the same good traffic.

The misbehaving clients run in a process of their own (so they do not slow the good
clients' side of this script) and, in turns: drop SSE streams after the first event
(a TCP reset), send numerically unsafe sampling values, send headers one byte at a
time (slowloris), and send bodies over the size limit.

Reports, clean vs misbehaving: the good requests' success rate (goal 100%) and p50 /
p99 latency (goal: p99 within 1.5x of the clean run), what the bad clients got back,
server RSS and thread count sampled every second (goal: flat after warm-up), and the
time from SIGTERM to exit at the end, with bad clients still connected (goal < 5 s).

    python benchmarks/soak.py                       # 120 s clean + 120 s misbehaving
    python benchmarks/soak.py --seconds 5 --name ci_soak   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from stats import percentile  # noqa: E402  (next to this script)

ROOT = Path(__file__).resolve().parent.parent
STREAM = "/api/v1/task/server-streaming-text-generation"
GENERATE = "/api/v1/task/text-generation"
RECORDS = [
    {"input": "a wonderful, moving film", "output": "positive"},
    {"input": "a dull and lifeless mess", "output": "negative"},
] * 8


# ------------------------------------------------------------------ good traffic


def good_traffic(client, models: list[str], clients: int, seconds: float, new_tokens: int) -> dict:
    """`clients` threads, each cycling REST unary, REST stream, gRPC unary, gRPC stream
    over the models, for `seconds`."""
    latencies, failures, done = [], [], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def one(kind: int, model: str, text: str) -> int:
        if kind == 0:
            return client.generate(model, text, **params)["generated_tokens"]
        if kind == 1:
            return len(list(client.stream(model, text, **params)))
        if kind == 2:
            return int(client.generate_grpc(model, text, **params)["generated_tokens"])
        return len(list(client.stream_grpc(model, text, **params)))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            kind, model = rng.randrange(4), rng.choice(models)
            began = time.perf_counter()
            try:
                tokens = one(kind, model, f"review {rng.randrange(1000)}")
                ok = tokens == new_tokens
                error = None if ok else f"{tokens} tokens"
            except Exception as err:  # noqa: BLE001  (counted and reported)
                ok, error = False, repr(err)[:160]
            with lock:
                done[0] += 1
                if ok:
                    latencies.append(time.perf_counter() - began)
                else:
                    failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "requests": done[0],
        "succeeded": len(latencies),
        "success_rate": round(len(latencies) / max(done[0], 1), 4),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3),
        "failure_samples": failures[:3],
    }


# -------------------------------------------------------------- bad traffic


def _drop_stream(port: int, model: str) -> str:
    body = json.dumps({"model_id": model, "inputs": "x", "parameters": {"max_new_tokens": 200}})
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {STREAM} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    received = b""
    while b"data:" not in received and len(received) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return "dropped" if b"data:" in received else "no event"


def _status(sock: socket.socket) -> str:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(1024)
        if not chunk:
            break
        answer += chunk
    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"


def _bad_values(port: int, model: str) -> str:
    body = json.dumps(
        {
            "model_id": model,
            "inputs": "x",
            "parameters": random.choice(
                [
                    {"decoding_method": "SAMPLING", "temperature": 1e-300},
                    {"repetition_penalty": 1e-300},
                    {"exponential_decay_length_penalty": {"start_index": 0, "decay_factor": 1e308}},
                ]
            ),
        }
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
    )
    status = _status(sock)
    sock.close()
    return status


def _slow_headers(port: int, _model: str) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    try:
        for _ in range(30):  # one byte a second, never finishing
            sock.sendall(b"X")
            time.sleep(1.0)
    except OSError:
        pass
    sock.settimeout(5)
    try:
        status = _status(sock)
    except OSError:
        status = "closed"
    sock.close()
    return status


def _oversized(port: int, model: str) -> str:
    body = b'{"model_id": "' + model.encode() + b'", "inputs": "' + b"a" * (8 * 2**20) + b'"}'
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(
            f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        sock.sendall(body)
        status = _status(sock)
    except OSError:
        status = "reset"
    sock.close()
    return status


MISBEHAVIOURS = {
    "dropped_stream": _drop_stream,
    "bad_sampling_values": _bad_values,
    "slow_headers": _slow_headers,
    "oversized_body": _oversized,
}


def bad_traffic(port: int, models: list[str], clients: int, seconds: float, queue) -> None:
    """In a process of its own: `clients` threads misbehaving for `seconds`, each
    thread in one of the ways, the ways shared out evenly. What has not ended a second
    after the end (a slow-headers client waits out the server's header timeout) is
    counted as "in flight", and the phase does not wait for it."""
    outcomes: dict[str, dict[str, int]] = {name: {} for name in MISBEHAVIOURS}
    lock = threading.Lock()
    stop_at = time.time() + seconds
    ways = [list(MISBEHAVIOURS)[index % len(MISBEHAVIOURS)] for index in range(clients)]

    def worker(name: str) -> None:
        while time.time() < stop_at:
            try:
                outcome = MISBEHAVIOURS[name](port, random.choice(models))
            except Exception as err:  # noqa: BLE001  (an outcome like any other)
                outcome = type(err).__name__
            with lock:
                outcomes[name][outcome] = outcomes[name].get(outcome, 0) + 1
            time.sleep(0.1)

    threads = [threading.Thread(target=worker, args=(name,), daemon=True) for name in ways]
    for thread in threads:
        thread.start()
    queue.put("started")
    for thread in threads:
        thread.join(max(0.0, stop_at - time.time()) + 1.0)
    with lock:
        for name, thread in zip(ways, threads, strict=True):
            if thread.is_alive():
                counts = outcomes[name]
                counts["in flight"] = counts.get("in flight", 0) + 1
        queue.put(outcomes)


# --------------------------------------------------------- server and jobs


class Sampler(threading.Thread):
    """Server RSS (MB) and thread count, once a second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, float, int]] = []
        self.started = time.monotonic()
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                rss = self.process.memory_info().rss / 2**20
                self.samples.append(
                    (
                        round(time.monotonic() - self.started, 1),
                        round(rss, 1),
                        self.process.num_threads(),
                    )
                )
            except Exception:  # noqa: BLE001  (the server is gone)
                return
            time.sleep(1.0)

    def window(self, start: float, end: float) -> dict:
        rows = [s for s in self.samples if start <= s[0] <= end] or [(0, 0, 0)]
        return {
            "rss_mb_first": rows[0][1],
            "rss_mb_last": rows[-1][1],
            "rss_mb_max": max(r[1] for r in rows),
            "threads_first": rows[0][2],
            "threads_last": rows[-1][2],
            "threads_max": max(r[2] for r in rows),
        }


def training_loop(client, stop: threading.Event, results: list[str]) -> None:
    """Small prompt-tuning jobs back to back, as long as the soak runs."""
    index = 0
    while not stop.is_set():
        index += 1
        try:
            job = client.train_prompt_tuning(
                f"soak-trained-{index % 3}",
                "tiny",
                records=RECORDS,
                tuning_config={"num_virtual_tokens": 4},
                num_epochs=3,
                batch_size=4,
            )
            results.append(client.wait(job, poll_seconds=0.5, timeout=300)["state"])
        except Exception as err:  # noqa: BLE001  (reported)
            results.append(repr(err)[:120])


def phase(client, models, args, sampler, bad_clients: int, port: int) -> dict:
    start = time.monotonic() - sampler.started
    outcome = None
    process, queue = None, None
    if bad_clients:
        queue = multiprocessing.get_context("spawn").Queue()
        process = multiprocessing.get_context("spawn").Process(
            target=bad_traffic,
            args=(port, models, bad_clients, args.seconds, queue),
            daemon=True,
        )
        process.start()
        # The good clients start once the bad ones are at it (a spawned process
        # takes seconds to import).
        assert queue.get(timeout=120) == "started"
    good = good_traffic(client, models, args.clients, args.seconds, args.new_tokens)
    if process is not None:
        outcome = queue.get(timeout=120)
        process.join(10)
    end = time.monotonic() - sampler.started
    return {"good": good, "bad": outcome, "server": sampler.window(start, end)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120, help="per phase")
    parser.add_argument("--clients", type=int, default=8, help="good clients")
    parser.add_argument("--bad-clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--name", default="soak")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit_tuning  # noqa: F401
    from caikit_tuning import PeftPromptTuning, TextGeneration
    from caikit_tuning.runtime.process import RuntimeProcess
    from caikit_tuning.testing.tiny_models import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        texts = [r["input"] for r in RECORDS] * 40 + ["positive negative"] * 20
        build_tiny_llama(workdir / "base" / "tiny", texts)
        server = RuntimeProcess(workdir, workdir / "base")
        TextGeneration.bootstrap(str(workdir / "base" / "tiny")).save(str(server.models / "base"))
        from caikit.core.data_model import DataStream

        from caikit_tuning import TrainGenerationRecord, TuningConfig

        prompt = PeftPromptTuning.train(
            str(workdir / "base" / "tiny"),
            DataStream.from_iterable([TrainGenerationRecord(**r) for r in RECORDS]),
            TuningConfig(num_virtual_tokens=4),
            num_epochs=2,
            verbalizer="Review: {{input}} Sentiment:",
        )
        prompt.save(str(server.models / "prompt"))
        models = ["base", "prompt"]
        server.start()
        sampler = Sampler(server.process.pid)
        sampler.start()
        client = server.client()
        stop_training, jobs = threading.Event(), []
        trainer = threading.Thread(target=training_loop, args=(client, stop_training, jobs))
        try:
            good_traffic(client, models, args.clients, min(10.0, args.seconds), args.new_tokens)
            trainer.start()
            clean = phase(client, models, args, sampler, 0, server.http_port)
            misbehaving = phase(client, models, args, sampler, args.bad_clients, server.http_port)
            stop_training.set()
            trainer.join(120)
            # SIGTERM with bad clients still connected: open streams never read.
            lingering = [_open_unread_stream(server.http_port) for _ in range(8)]
            began = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # Where it hangs: the server dumps every thread's stack on SIGUSR1.
                server.process.send_signal(signal.SIGUSR1)
                time.sleep(2)
                log = server.log_file.read_text(errors="replace")
                raise SystemExit(
                    f"the server did not exit after SIGTERM:\n{log[-12000:]}"
                ) from None
            shutdown = round(time.monotonic() - began, 2)
            for sock in lingering:
                sock.close()
        finally:
            stop_training.set()
            sampler.running = False
            server.stop()
        trainer.join(30)

    summary = {
        "model": "tiny llama (2 layers, hidden 48): a bootstrapped base and a prompt model",
        "seconds_per_phase": args.seconds,
        "good_clients": args.clients,
        "bad_clients": args.bad_clients,
        "clean": clean,
        "misbehaving": misbehaving,
        "p99_ratio": round(
            misbehaving["good"]["p99_latency_s"] / max(clean["good"]["p99_latency_s"], 1e-9), 2
        ),
        "training_jobs": {state: jobs.count(state) for state in sorted(set(jobs))},
        "shutdown_seconds": shutdown,
        "samples": sampler.samples,
    }
    lines = report(summary)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _open_unread_stream(port: int) -> socket.socket:
    body = json.dumps({"model_id": "base", "inputs": "x", "parameters": {"max_new_tokens": 5000}})
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {STREAM} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    return sock


def report(summary: dict) -> list[str]:
    clean, bad = summary["clean"], summary["misbehaving"]

    def row(name: str, key: str, source: str = "good") -> str:
        return f"| {name} | {clean[source][key]} | {bad[source][key]} |"

    def spread(name: str, key: str) -> str:
        def cell(server: dict) -> str:
            return " / ".join(str(server[f"{key}_{part}"]) for part in ("first", "last", "max"))

        return f"| {name} | {cell(clean['server'])} | {cell(bad['server'])} |"

    outcomes = bad["bad"] or {}
    return [
        f"# Soak test ({summary['seconds_per_phase']} s per phase, loopback, {summary['model']})",
        "",
        f"{summary['good_clients']} good clients (REST and gRPC, unary and streaming, two models) "
        f"with training jobs running; then the same with {summary['bad_clients']} misbehaving "
        "clients alongside.",
        "",
        "| | clean | with misbehaving clients |",
        "| --- | --- | --- |",
        row("good requests", "requests"),
        row("good success rate (goal 1.0)", "success_rate"),
        row("good p50 latency (s)", "p50_latency_s"),
        row("good p99 latency (s)", "p99_latency_s"),
        spread("server RSS first / last / max (MB)", "rss_mb"),
        spread("server threads first / last / max", "threads"),
        "",
        f"p99 ratio (goal <= 1.5): {summary['p99_ratio']}. Training jobs: {summary['training_jobs']}. "
        f"Shutdown (SIGTERM to exit, 8 unread streams open; goal < 5 s): {summary['shutdown_seconds']} s.",
        "",
        "What the misbehaving clients got: "
        + "; ".join(f"{name} {counts}" for name, counts in outcomes.items()),
    ]


if __name__ == "__main__":
    main()
