"""The training benchmark runs end to end on a tiny model (seconds), so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train_throughput(tmp_path, *args) -> subprocess.CompletedProcess:
    """benchmarks/train_throughput.py on the tiny model, one repeat, results in tmp_path."""
    return subprocess.run(
        [
            sys.executable,
            "benchmarks/train_throughput.py",
            *("--model", "tiny", "--repeats", "1", "--results-dir", str(tmp_path)),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_throughput_benchmark_smoke(tmp_path):
    out = train_throughput(tmp_path, "--steps", "3", "--eval-rows", "4", "--name", "ci_smoke")
    assert out.returncode == 0, out.stderr[-2000:]
    results = tmp_path
    summary = json.loads((results / "ci_smoke.json").read_text())
    for variant in ("project", "baseline"):
        assert summary[variant]["runs"][0]["steps"] == 3
        assert summary[variant]["tokens_per_second"] > 0
    assert "tokens_per_second" in summary["ratios"]
    assert "| train tokens/s" in (results / "ci_smoke.md").read_text()
    assert len(summary["paired_call_speedups"]) == 1


def test_train_throughput_against_a_revision_runs_that_revision(tmp_path):
    """The baseline is the project at HEAD, imported from a worktree that is gone after."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    out = train_throughput(
        tmp_path,
        *("--steps", "2", "--eval-rows", "4", "--against-revision", "HEAD"),
        "--name",
        "ab",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "ab.json").read_text())
    revision_run, own_run = summary["baseline"]["runs"][0], summary["project"]["runs"][0]
    assert Path(own_run["source"]) == ROOT
    assert Path(revision_run["source"]) != ROOT and not Path(revision_run["source"]).exists()
    assert summary["config"]["against_revision"] == head.stdout.strip()
    assert revision_run["steps"] == own_run["steps"] == 2
    assert f"caikit_tuning at `{head.stdout.strip()}`" in (tmp_path / "ab.md").read_text()
    worktrees = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True
    )
    assert revision_run["source"] not in worktrees.stdout


def test_train_throughput_refuses_an_unknown_revision(tmp_path):
    out = train_throughput(tmp_path, "--steps", "2", "--against-revision", "no-such-revision")
    assert out.returncode != 0
    assert "--against-revision: no commit 'no-such-revision'" in out.stderr


def run_benchmark(script, tmp_path, *args):
    out = subprocess.run(
        [
            sys.executable,
            f"benchmarks/{script}",
            "--model",
            "tiny",
            "--results-dir",
            str(tmp_path),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(next(tmp_path.glob("*.json")).read_text())


def test_serving_benchmark_smoke(tmp_path):
    summary = run_benchmark(
        "serving_batching.py", tmp_path, "--requests", "16", "--models", "5", "--new-tokens", "4"
    )
    assert summary["sequential"]["errors"] == summary["concurrent"]["errors"] == 0
    assert summary["throughput_ratio"] > 0 and summary["memory_ratio"] > 0


def test_serving_while_training_benchmark_smoke(tmp_path):
    """A server from the shipped config trains while clients ask it, for two spin cases."""
    results = run_benchmark(
        "serving_while_training.py",
        tmp_path,
        *("--steps", "3", "--rounds", "1", "--spins", "1000", "--clients", "2"),
        *("--workdir", str(tmp_path / "work"), "--give-up-seconds", "120", "--name", "ci_smoke"),
    )
    assert [r["case"] for r in results] == ["shipped", "spin_1000"]
    for result in results:
        assert result["state"] == "COMPLETED", result
        assert result["training_seconds"] > 0 and result["requests_per_second"] > 0


def test_serving_adapters_benchmark_smoke(tmp_path):
    summary = run_benchmark(
        "serving_adapters.py",
        tmp_path,
        *(
            "--loras",
            "5",
            "--prompts",
            "4",
            "--requests",
            "16",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
        ),
    )
    for family in ("causal", "seq2seq"):
        result = summary[family]
        for phase in ("sequential", "concurrent", "base_alone", "base_alone_verbalized"):
            assert result[phase]["errors"] == 0, (family, phase, result[phase])
        assert result["probes"][result["cold_model"]]["first_token_s"] > 0
        assert result["memory_ratio"] > 0 and result["concurrent_over_base_alone"] > 0


def test_openai_routes_benchmark_smoke(tmp_path):
    summary = run_benchmark(
        "openai_routes.py",
        tmp_path,
        *("--requests", "4", "--clients", "2"),
        *("--repeats", "1", "--new-tokens", "2"),
    )
    assert summary["errors"] == {"caikit": 0, "openai": 0}
    assert summary["openai_over_caikit"] > 0


def test_prompt_quality_benchmark_smoke(tmp_path):
    summary = run_benchmark(
        "prompt_quality.py",
        tmp_path,
        *("--sets", "question_type", "--inits", "RANDOM", "LABELS"),
        *("--records", "16", "--eval-rows", "6", "--seeds", "0"),
    )
    cells = [(c["init"], c["variant"]) for c in summary["cells"]]
    # peft has no label init: the baseline runs RANDOM only.
    assert cells == [
        ("RANDOM", "project"),
        ("RANDOM", "project_fp32"),
        ("RANDOM", "baseline"),
        ("LABELS", "project"),
        ("LABELS", "project_fp32"),
    ]
    assert all(0 <= a <= 1 for c in summary["cells"] for a in c["accuracy"])


def test_step_profile_benchmark_smoke(tmp_path):
    summary = run_benchmark("step_profile.py", tmp_path, "--steps", "2")
    assert summary["steps"] == 2
    kinds = summary["kinds_ms_per_step"]
    assert kinds["matrix products"] > 0
    # The kinds add up to the step's wall time (what is left is outside operators).
    assert sum(kinds.values()) >= 0.99 * summary["wall_ms_per_step"]


def test_generation_speed_benchmark_smoke(tmp_path):
    summary = run_benchmark(
        "generation_speed.py", tmp_path, "--repeats", "1", "--max-new-tokens", "4"
    )
    assert summary["texts_identical"]


def test_load_test_ci_sized_has_no_errors(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/load_test.py",
            "--requests",
            "64",
            "--concurrency",
            "16",
            "--jobs",
            "2",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "load_test.json").read_text())
    assert summary["rest"]["errors"] == 0 and summary["grpc"]["errors"] == 0, summary
    assert summary["training"]["completed"] == 2 and summary["training"]["most_queued_at_once"] >= 1


def test_soak_ci_sized_keeps_every_good_request(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/soak.py",
            "--seconds",
            "2",
            "--clients",
            "4",
            "--bad-clients",
            "4",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "soak.json").read_text())
    for phase in ("clean", "misbehaving"):
        assert summary[phase]["good"]["success_rate"] == 1.0, summary[phase]["good"]
    bad = summary["misbehaving"]["bad"]
    assert set(bad["bad_sampling_values"]) == {"400"} and set(bad["oversized_body"]) == {"413"}
    assert summary["shutdown_seconds"] < 6


def test_gpu_check_says_in_one_line_when_there_is_no_gpu():
    import shutil

    import torch

    if torch.cuda.is_available() or shutil.which("nvidia-smi"):
        import pytest

        pytest.skip("a GPU machine: benchmarks/gpu_check.sh runs the real check there")
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): the CUDA checks are skipped."
    ]
