"""The training benchmark runs end to end on a tiny model (seconds), so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_benchmark_smoke(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_throughput.py",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--eval-rows",
            "4",
            "--name",
            "ci_smoke",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = tmp_path
    summary = json.loads((results / "ci_smoke.json").read_text())
    for variant in ("project", "baseline"):
        assert summary[variant]["runs"][0]["steps"] == 3
        assert summary[variant]["tokens_per_second"] > 0
    assert "tokens_per_second" in summary["ratios"]
    assert "| train tokens/s" in (results / "ci_smoke.md").read_text()
