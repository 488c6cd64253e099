"""Serving many LoRA and prompt-tuned models of one base: memory, mixed batches, cold loads.

One server, one run, side by side, for a causal LM (SmolLM2-135M-Instruct by default) and
a seq2seq model (a tiny T5 built here):

- memory: the server's RSS after a concurrent load on the base model, with the base
  model alone, then with every LoRA and prompt model loaded (each by a request to it);
- throughput: greedy requests spread over 8 models (4 LoRA, 4 prompt) sent one by one,
  then by 16 concurrent clients, and the same concurrent load sent to the base model
  alone (as sent, and as the tuned models' verbalizer renders it); medians of
  interleaved repeats;
- a cold adapter: a model not loaded yet is asked for while 15 clients run; its
  first-token latency beside a loaded model's, and the others' p50/p99 meanwhile.

    python benchmarks/serving_adapters.py                    # SmolLM2-135M + tiny T5
    python benchmarks/serving_adapters.py --model tiny --loras 6 --prompts 6 --requests 16
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from serving_batching import make_prompt_models, rss_mb  # noqa: E402  (next to this script)
from stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = [
    "A gorgeous, moving film.",
    "A dull, lifeless mess.",
    "Sharp writing and a cast that never hits a false note.",
    "Two hours I will never get back.",
]


def make_lora_models(base_model: str, folder: Path, count: int, prefix: str) -> list[str]:
    """`count` LoRA r=8 models of `base_model`: one short training, then copies whose
    adapter matrices are moved apart (what matters here is how many there are)."""
    import torch
    from caikit.core.data_model import DataStream
    from safetensors.torch import load_file, save_file

    from caikit_tuning import TrainGenerationRecord
    from caikit_tuning.modules.lora import LoraTuning

    rows = [
        TrainGenerationRecord(input=text, output=label)
        for text, label in zip(REVIEWS, ["positive", "negative"] * 2, strict=True)
    ] * 2
    model = LoraTuning.train(
        base_model,
        DataStream.from_iterable(rows),
        verbalizer="Review: {{input}} Sentiment:",
        adapter_config={"adapter_type": "LORA", "r": 8, "alpha": 16},
        num_epochs=1,
        batch_size=8,
        learning_rate=1e-3,
    )
    first = folder / f"{prefix}-000"
    model.save(str(first))
    weights = Path("adapter") / "adapter_model.safetensors"
    tensors = load_file(str(first / weights))
    names = [first.name]
    generator = torch.Generator().manual_seed(0)
    for index in range(1, count):
        name = f"{prefix}-{index:03d}"
        shutil.copytree(first, folder / name)
        # A briefly trained B is near zero: every copy gets B matrices of its own.
        moved = {
            key: value + 0.01 * torch.randn(value.shape, generator=generator)
            if "lora_B" in key
            else value
            for key, value in tensors.items()
        }
        save_file(moved, str(folder / name / weights), metadata={"format": "pt"})
        names.append(name)
    return names


def make_base_model(base_model: str, folder: Path, name: str) -> str:
    from caikit_tuning import TextGeneration

    TextGeneration.bootstrap(base_model).save(str(folder / name))
    return name


def load_phase(
    client,
    models: list[str],
    requests: int,
    clients: int,
    tokens: int,
    template: str = "{}",
    probes: tuple[str, ...] = (),
) -> dict:
    """`requests` greedy requests round-robin over `models` from `clients` threads, each
    text put through `template`. With `probes`, once a quarter of the requests are done,
    one streamed request to each probe model in turn, timed to its first token."""
    finished: list[tuple[float, float]] = []  # (start, end) per request
    generated = [0]
    errors = [0]
    lock = threading.Lock()
    jobs = list(range(requests))
    probed: dict[str, tuple[float, float]] = {}
    quarter = threading.Event()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                index = jobs.pop()
            text = template.format(f"request {index}: {REVIEWS[index % len(REVIEWS)]}")
            began = time.perf_counter()
            try:
                out = client.generate(
                    models[index % len(models)], text, max_new_tokens=tokens, min_new_tokens=tokens
                )
            except Exception:  # noqa: BLE001  (counted, reported)
                with lock:
                    errors[0] += 1
                continue
            with lock:
                finished.append((began, time.perf_counter()))
                generated[0] += out["generated_tokens"]
                if len(finished) >= requests // 4:
                    quarter.set()

    def probe():
        quarter.wait()
        for model in probes:
            began = time.perf_counter()
            stream = client.stream(model, "A probe.", max_new_tokens=tokens)
            next(stream)
            probed[model] = (began, time.perf_counter())
            for _ in stream:
                pass

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    if probes:
        threads.append(threading.Thread(target=probe))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    latencies = [end - start for start, end in finished]
    result = {
        "clients": clients,
        "requests": requests,
        "errors": errors[0],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(generated[0] / seconds, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3),
    }
    for model, (start, first) in probed.items():
        during = [e - s for s, e in finished if e > start and s < first]  # overlapping it
        result.setdefault("probes", {})[model] = {
            "first_token_s": round(first - start, 3),
            "others_meanwhile": len(during),
            "others_p50_s": round(percentile(during, 0.5), 3) if during else None,
            "others_p99_s": round(percentile(during, 0.99), 3) if during else None,
        }
    return result


def median_phase(results: list[dict]) -> dict:
    """The run of median throughput, with every run's throughput beside it."""
    ordered = sorted(results, key=lambda r: r["tokens_per_second"])
    return {**ordered[len(ordered) // 2], "runs": [r["tokens_per_second"] for r in results]}


def family_run(client, server, names: dict, args) -> dict:
    """Every measurement for one base model's family of models."""
    base, loras, prompts, cold = names["base"], names["loras"], names["prompts"], names["cold"]
    mixed = [*loras[:4], *prompts[:4]]
    load = functools.partial(
        load_phase, client, requests=args.requests, clients=args.clients, tokens=args.new_tokens
    )
    # Memory: the server after the same concurrent load on the base model, first with
    # the base alone, then with every LoRA and prompt model loaded.
    client.generate(base, "warm-up", max_new_tokens=2)
    load([base])
    rss_base = rss_mb(server.process.pid)
    for model in [*loras, *prompts]:
        client.generate(model, "load", max_new_tokens=1)
    load([base])
    rss_all = rss_mb(server.process.pid)
    # Throughput, repeated and interleaved (this machine is shared and noisy): the 8
    # models one request at a time, then concurrently; the base model under the same
    # requests, and under the texts the tuned models see (their verbalizer applied).
    runs: dict[str, list[dict]] = {key: [] for key in PHASES}
    for _ in range(args.repeats):
        runs["sequential"].append(load(mixed, requests=args.requests // 4, clients=1))
        runs["concurrent"].append(load(mixed))
        runs["base_alone"].append(load([base]))
        runs["base_alone_verbalized"].append(load([base], template=VERBALIZER))
    phases = {name: median_phase(results) for name, results in runs.items()}
    # A cold adapter, asked for while clients - 1 others run (so it never waits for a
    # free row of the batch), after the same probe to a model already loaded.
    probed = load(mixed, clients=args.clients - 1, probes=(loras[0], cold))
    concurrent = phases["concurrent"]["tokens_per_second"]
    return {
        **phases,
        "probes": probed["probes"],
        "probe_run": {k: v for k, v in probed.items() if k != "probes"},
        "loras": len(loras),
        "prompts": len(prompts),
        "cold_model": cold,
        "warm_model": loras[0],
        "rss_mb_base_alone": round(rss_base, 1),
        "rss_mb_all_loaded": round(rss_all, 1),
        "memory_ratio": round(rss_all / rss_base, 3),
        "concurrent_over_sequential": round(
            concurrent / phases["sequential"]["tokens_per_second"], 2
        ),
        "concurrent_over_base_alone": round(
            concurrent / phases["base_alone"]["tokens_per_second"], 3
        ),
        "concurrent_over_base_verbalized": round(
            concurrent / phases["base_alone_verbalized"]["tokens_per_second"], 3
        ),
    }


VERBALIZER = "Review: {} Sentiment:"
PHASES = ("sequential", "concurrent", "base_alone", "base_alone_verbalized")


def table(label: str, result: dict, args) -> list[str]:
    cold, warm = result["probes"][result["cold_model"]], result["probes"][result["warm_model"]]
    rows = [
        ("sequential, 8 models (1 client)", result["sequential"]),
        (f"concurrent, 8 models ({args.clients} clients)", result["concurrent"]),
        (f"concurrent, base model alone ({args.clients} clients)", result["base_alone"]),
        ("the same, texts as the tuned models see them", result["base_alone_verbalized"]),
    ]
    return [
        f"## {label}",
        "",
        "| load | tokens/s (median) | runs | p50 latency (s) | p99 latency (s) | errors |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {p['tokens_per_second']} | {', '.join(map(str, p['runs']))} | "
            f"{p['p50_latency_s']} | {p['p99_latency_s']} | {p['errors']} |"
            for name, p in rows
        ),
        "",
        f"- Mixed models, concurrent / sequential: **{result['concurrent_over_sequential']}x** "
        "(goal >= 4x).",
        f"- Mixed models / base model alone, same requests: "
        f"**{result['concurrent_over_base_alone']}** (goal >= 0.8); against the base model "
        f"given the verbalized texts: {result['concurrent_over_base_verbalized']}.",
        f"- Server RSS after the same load on the base model: {result['rss_mb_base_alone']} MB "
        f"with the base model alone, {result['rss_mb_all_loaded']} MB with {result['loras']} "
        f"LoRA + {result['prompts']} prompt models loaded: **{result['memory_ratio']}x** "
        "(goal <= 1.2x).",
        f"- Cold adapter ({result['cold_model']}, loaded by its first request) while "
        f"{args.clients - 1} clients run: first token after **{cold['first_token_s']} s** "
        f"(a loaded model's, just before: {warm['first_token_s']} s); the "
        f"{cold['others_meanwhile']} requests running meanwhile: p50 {cold['others_p50_s']} s, "
        f"p99 {cold['others_p99_s']} s (whole run: p50 {result['probe_run']['p50_latency_s']} s, "
        f"p99 {result['probe_run']['p99_latency_s']} s).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help='a name under base_models_dir, or "tiny"'
    )
    parser.add_argument("--loras", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each phase (medians)")
    parser.add_argument("--no-seq2seq", action="store_true", help="skip the tiny T5 part")
    parser.add_argument("--name", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit

    import caikit_tuning  # noqa: F401
    from caikit_tuning.runtime.process import RuntimeProcess
    from caikit_tuning.testing.tiny_models import build_tiny_llama, build_tiny_t5

    texts = [*REVIEWS, "positive negative"] * 40
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base_dir = workdir / "base"
        if args.model == "tiny":
            build_tiny_llama(base_dir / "tiny", texts)
        else:
            source = (ROOT / caikit.get_config().base_models_dir).resolve() / args.model
            (base_dir / args.model).mkdir(parents=True)
            for file in source.iterdir():  # the folder lies inside base_dir, its files link
                (base_dir / args.model / file.name).symlink_to(file.resolve())
        if not args.no_seq2seq:
            build_tiny_t5(base_dir / "tiny-t5", texts)
        caikit.configure(config_dict={"base_models_dir": str(base_dir)})
        server = RuntimeProcess(
            workdir,
            base_dir,
            {"runtime": {"metrics": {"enabled": False}, "lazy_load_poll_period_seconds": 3600}},
        )
        plan = {args.model: "causal"} | ({} if args.no_seq2seq else {"tiny-t5": "seq2seq"})
        for model, family in plan.items():
            models = make_prompt_models(model, server.models, args.prompts)
            for name in models:  # prompt-000 -> causal-prompt-000
                (server.models / name).rename(server.models / f"{family}-{name}")
            families[family] = {
                "base": make_base_model(model, server.models, f"{family}-base"),
                "loras": make_lora_models(model, server.models, args.loras + 1, f"{family}-lora"),
                "prompts": [f"{family}-{name}" for name in models],
            }
            # The last adapter stays unloaded until the cold-load probe asks for it.
            families[family]["cold"] = families[family]["loras"].pop()
        server.start(timeout=300, env={"OMP_NUM_THREADS": str(args.threads)})
        results = {}
        try:
            client = server.client()
            for family, names in families.items():
                results[family] = family_run(client, server, names, args)
        finally:
            server.stop()

    summary = {
        "model": args.model,
        "new_tokens_per_request": args.new_tokens,
        "threads": args.threads,
        **results,
    }
    lines = [
        f"# Serving LoRA and prompt models of one base: {args.model}",
        "",
        f"Greedy requests of {args.new_tokens} new tokens over REST, {args.threads} threads; "
        f"{args.requests} requests per concurrent phase ({args.requests // 4} sequential), "
        f"median of {args.repeats} interleaved runs. One server, one run. The 8 models are "
        "4 LoRA (r=8) and 4 prompt models (20 virtual tokens) of the base.",
        "",
        *table(f"Causal LM: {args.model}", results["causal"], args),
    ]
    if "seq2seq" in results:
        lines += table("Seq2seq: tiny T5 (built by the benchmark)", results["seq2seq"], args)
    stem = args.name or f"serving_adapters_{args.model}"
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
