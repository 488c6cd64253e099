"""Medians, ratios and the markdown table of benchmarks/train_throughput.py."""

from __future__ import annotations

import statistics


def summarize(runs: dict[str, list[dict]], peaks: dict, config: dict) -> dict:
    summary: dict = {
        "config": {k: v for k, v in config.items() if not k.endswith("_rows")},
        "matmul_peak_gflops": peaks,
    }
    for variant, results in runs.items():
        tokens_per_s = [r["real_tokens"] / r["train_seconds"] for r in results]
        useful = [
            4 * r["parameters"] * r["real_tokens"] / r["train_seconds"] / 1e9 for r in results
        ]
        summary[variant] = {
            "runs": results,
            "tokens_per_second": round(statistics.median(tokens_per_s), 1),
            "padding_fraction": round(
                statistics.median(
                    r["padded_tokens"] / (r["padded_tokens"] + r["real_tokens"]) for r in results
                ),
                4,
            ),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in results), 1),
            "peak_gpu_mb": _median_or_none([r.get("peak_gpu_mb") for r in results]),
            "call_seconds": round(statistics.median(r["call_seconds"] for r in results), 2),
            "seconds_to_first_step": round(
                statistics.median(r["wall_seconds_to_first_step"] for r in results), 2
            ),
            "final_loss": round(statistics.median(r["final_loss"] for r in results), 4),
            "heldout_loss": round(statistics.median(r["heldout_loss"] for r in results), 4),
            "useful_gflops": round(statistics.median(useful), 1),
            "useful_fraction_of_bf16_peak": round(statistics.median(useful) / peaks["bfloat16"], 3),
            "useful_fraction_of_fp32_peak": round(statistics.median(useful) / peaks["float32"], 3),
        }
    project, baseline = summary["project"], summary["baseline"]
    summary["ratios"] = {
        key: round(project[key] / baseline[key], 3)
        for key in (
            "tokens_per_second",
            "call_seconds",
            "peak_rss_mb",
            "seconds_to_first_step",
            "final_loss",
            "heldout_loss",
        )
        if baseline[key]
    }
    # Each repeat ran the two back to back: the spread of these is the machine's noise.
    summary["paired_call_speedups"] = [
        round(b["call_seconds"] / p["call_seconds"], 2)
        for p, b in zip(project["runs"], baseline["runs"], strict=True)
    ]
    return summary


def baseline_label(config: dict) -> str:
    revision = config.get("against_revision")
    return f"caikit_tuning at `{revision}`" if revision else "baseline (Trainer + peft)"


def _median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def pairs_text(summary: dict) -> str:
    """Each back-to-back pair's whole-call speed-up, as the tables print them."""
    return ", ".join(f"{x}x" for x in summary["paired_call_speedups"])


def markdown(summary: dict, title: str) -> str:
    p, b, r = summary["project"], summary["baseline"], summary["ratios"]
    c = summary["config"]
    lines = [
        f"# {title}",
        "",
        f"Model `{c['model']}`, workload `{c.get('workload', 'short')}` (targets up to "
        f"{c.get('max_target_length', 8)} tokens), {c['steps']} steps x batch {c['batch_size']}, lr {c['learning_rate']}, "
        f"{c['num_virtual_tokens']} virtual tokens, {c['threads']} threads, median of {c['repeats']} runs. "
        f"torch.mm peak: {summary['matmul_peak_gflops']} GFLOP/s."
        + (
            " caikit_tuning with `torch_compile` (first step includes compiling)."
            if c.get("torch_compile")
            else ""
        )
        + (
            f" Both variants ran with `LD_PRELOAD={c['ld_preload']}`."
            if c.get("ld_preload")
            else ""
        ),
        "",
        f"| metric | caikit_tuning | {baseline_label(c)} | ratio |",
        "| --- | --- | --- | --- |",
        f"| train tokens/s (real tokens) | {p['tokens_per_second']} | {b['tokens_per_second']} | {r['tokens_per_second']} |",
        f"| padding share of processed positions | {p['padding_fraction']:.1%} | {b['padding_fraction']:.1%} | |",
        f"| whole train() call, s{'' if c.get('against_revision') else ' (baseline: from after its model load)'} | {p['call_seconds']} | {b['call_seconds']} | {r['call_seconds']} (speed-up {round(1 / r['call_seconds'], 2)}x; pairs {pairs_text(summary)}) |",
        f"| peak RSS (MB) | {p['peak_rss_mb']} | {b['peak_rss_mb']} | {r['peak_rss_mb']} |",
        f"| seconds to first step | {p['seconds_to_first_step']} | {b['seconds_to_first_step']} | {r['seconds_to_first_step']} |",
        f"| final train loss (last 10 steps) | {p['final_loss']} | {b['final_loss']} | {r['final_loss']} |",
        f"| held-out loss | {p['heldout_loss']} | {b['heldout_loss']} | {r['heldout_loss']} |",
        *(
            [f"| peak GPU memory (MB) | {p['peak_gpu_mb']} | {b['peak_gpu_mb']} | |"]
            if p.get("peak_gpu_mb") is not None
            else []
        ),
        f"| useful GFLOP/s (4 x parameters x real tokens / s) | {p['useful_gflops']} | {b['useful_gflops']} | |",
        f"| share of bf16 matmul peak | {p['useful_fraction_of_bf16_peak']:.1%} | {b['useful_fraction_of_bf16_peak']:.1%} | |",
        "",
    ]
    return "\n".join(lines)
