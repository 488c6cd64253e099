"""Greedy generation speed of a served base model: REST vs in-process vs plain transformers.

In one run, on the same prompts: (a) the caikit_tuning runtime serving a bootstrapped
TextGeneration model over REST (one request at a time), (b) TextGeneration.run
in-process, (c) plain `model.generate()` from transformers. Reports new tokens/s
(median of --repeats passes over the prompts) and the generated texts, which must be
identical across the three for greedy decoding.

    python benchmarks/generation_speed.py                      # SmolLM2-135M-Instruct
    python benchmarks/generation_speed.py --model tiny --repeats 1 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "To make a cup of tea, first",
    "The three primary colors are",
]


def timed(generate, prompts: list[str]) -> tuple[float, list[str], int]:
    """(seconds, texts, new tokens) for generating every prompt once."""
    begin = time.perf_counter()
    results = [generate(prompt) for prompt in prompts]
    seconds = time.perf_counter() - begin
    return seconds, [text for text, _ in results], sum(count for _, count in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help='a name under base_models_dir, or "tiny"'
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import caikit
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caikit_tuning import TextGeneration
    from caikit_tuning.runtime.process import RuntimeProcess

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model == "tiny":
            from caikit_tuning.testing.tiny_models import build_tiny_llama

            base_dir = workdir / "base"
            build_tiny_llama(base_dir / "tiny", PROMPTS * 20)
            name = "tiny"
        else:
            base_dir = (ROOT / caikit.get_config().base_models_dir).resolve()
            name = args.model
        folder = base_dir / name
        caikit.configure(config_dict={"base_models_dir": str(base_dir)})
        server = RuntimeProcess(workdir, base_dir, {"runtime": {"metrics": {"enabled": False}}})
        served = TextGeneration.bootstrap(str(folder), device="cpu")
        served.save(str(server.models / "base"))
        server.start()
        try:
            client = server.client()
            n = args.max_new_tokens

            def rest(prompt):
                out = client.generate("base", prompt, max_new_tokens=n)
                return out["generated_text"], out["generated_tokens"]

            def in_process(prompt):
                out = served.run(prompt, max_new_tokens=n)
                return out.generated_text, out.generated_tokens

            tokenizer = AutoTokenizer.from_pretrained(folder)
            plain_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

            def plain(prompt):
                ids = tokenizer(prompt, return_tensors="pt")
                with torch.inference_mode():
                    out = plain_model.generate(**ids, max_new_tokens=n, do_sample=False)[0]
                new = out[ids["input_ids"].shape[1] :]
                return tokenizer.decode(new, skip_special_tokens=True), len(new)

            variants = {"rest": rest, "in_process": in_process, "transformers": plain}
            for generate in variants.values():  # warm-up: first-call costs are not speed
                generate(PROMPTS[0])
            runs: dict[str, list] = {key: [] for key in variants}
            texts: dict[str, list[str]] = {}
            for _ in range(args.repeats):
                for key, generate in variants.items():
                    seconds, outputs, tokens = timed(generate, PROMPTS)
                    runs[key].append(tokens / seconds)
                    texts[key] = outputs
        finally:
            server.stop()

    summary = {
        "model": name,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "tokens_per_second": {k: round(statistics.median(v), 2) for k, v in runs.items()},
        "runs": runs,
        "texts_identical": texts["rest"] == texts["in_process"] == texts["transformers"],
        "outputs": [
            {"prompt": p, "rest": r, "transformers": t}
            for p, r, t in zip(PROMPTS, texts["rest"], texts["transformers"], strict=True)
        ],
    }
    tps = summary["tokens_per_second"]
    lines = [
        f"# Greedy generation speed: {name}",
        "",
        f"{len(PROMPTS)} prompts, {args.max_new_tokens} new tokens max, batch 1, {args.threads} threads, "
        f"median of {args.repeats} passes. Identical texts across the three: {summary['texts_identical']}.",
        "",
        "| path | new tokens/s | vs transformers |",
        "| --- | --- | --- |",
        *(f"| {k} | {v} | {v / tps['transformers']:.2f} |" for k, v in tps.items()),
        "",
        "| prompt | REST output |",
        "| --- | --- |",
        *(f"| {o['prompt']} | {json.dumps(o['rest'])} |" for o in summary["outputs"]),
        "",
    ]
    stem = args.name or f"generation_speed_{name}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
