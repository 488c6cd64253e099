"""The GPU check's runs and its one table (benchmarks/gpu_check.sh calls this on a CUDA
machine): the `gpu` tests, the training benchmark on cuda, the serving benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str], seconds: int) -> tuple[int, str]:
    began = time.perf_counter()
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
        code, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired:
        code, text = 124, f"timed out after {seconds} s"
    print(
        f"[{time.perf_counter() - began:5.0f} s] {' '.join(command[1:3])}: exit {code}", flush=True
    )
    return code, text


def main() -> None:
    import torch

    rows = [("device", torch.cuda.get_device_name(0), f"torch {torch.__version__}")]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        code, text = run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "tests/gpu",
                f"--junitxml={results}/gpu.xml",
                "-p",
                "no:cacheprovider",
            ],
            240,
        )
        if (results / "gpu.xml").is_file():
            for case in ET.parse(results / "gpu.xml").getroot().iter("testcase"):
                outcome = "passed"
                for child in case:
                    if child.tag in ("failure", "error"):
                        outcome = f"FAILED: {(child.get('message') or '')[:80]}"
                    elif child.tag == "skipped":
                        outcome = f"skipped: {(child.get('message') or '')[:60]}"
                rows.append(("test", case.get("name"), outcome))
        else:
            rows.append(("test", "tests/gpu", f"did not run (exit {code}): {text[-200:]}"))

        code, text = run(
            [
                sys.executable,
                "benchmarks/train_throughput.py",
                "--device",
                "cuda",
                "--steps",
                "40",
                "--repeats",
                "1",
                "--eval-rows",
                "20",
                "--name",
                "gpu_train",
                "--results-dir",
                tmp,
            ],
            240,
        )
        if code == 0:
            summary = json.loads((results / "gpu_train.json").read_text())
            p, b, r = summary["project"], summary["baseline"], summary["ratios"]
            rows += [
                (
                    "training",
                    "tokens/s (project / Trainer + peft)",
                    f"{p['tokens_per_second']} / {b['tokens_per_second']} ({r['tokens_per_second']}x)",
                ),
                (
                    "training",
                    "peak GPU memory MB (project / baseline)",
                    f"{p['peak_gpu_mb']} / {b['peak_gpu_mb']}",
                ),
                (
                    "training",
                    "useful FLOP/s = 4 x parameters x tokens/s, share of measured bf16 mm peak",
                    f"{p['useful_fraction_of_bf16_peak']:.1%} / {b['useful_fraction_of_bf16_peak']:.1%} (peak {summary['matmul_peak_gflops']['bfloat16']} GFLOP/s)",
                ),
            ]
        else:
            rows.append(
                (
                    "training",
                    "train_throughput.py --device cuda",
                    f"FAILED (exit {code}): {text[-200:]}",
                )
            )

        code, text = run(
            [
                sys.executable,
                "benchmarks/serving_batching.py",
                "--models",
                "10",
                "--threads",
                "4",
                "--results-dir",
                tmp,
            ],
            180,
        )
        served = list(results.glob("serving_batching_*.json"))
        if code == 0 and served:
            summary = json.loads(served[0].read_text())
            rows.append(
                (
                    "serving",
                    "16 clients / 1 client tokens/s",
                    f"{summary['concurrent']['tokens_per_second']} / {summary['sequential']['tokens_per_second']} ({summary['throughput_ratio']}x)",
                )
            )
        else:
            rows.append(("serving", "serving_batching.py", f"FAILED (exit {code}): {text[-200:]}"))

    print("\n| part | check | result |\n| --- | --- | --- |")
    for part, check, result in rows:
        print(f"| {part} | {check} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
