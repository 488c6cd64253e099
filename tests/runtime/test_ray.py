"""Training jobs on a Ray cluster (the RAY trainer): two data-parallel Ray Train workers
train the same model as one process; a dead worker is restarted and resumes from the
job's checkpoints; cancel stops the job; bad requests fail at submission."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from caikit_tuning.runtime.client import RuntimeCallError

from .conftest import Runtime, free_port

try:
    import ray
except ImportError:
    ray = None

pytestmark = [
    pytest.mark.skipif(ray is None, reason="needs Ray: pip install 'caikit-tuning[ray]'"),
    pytest.mark.runtime,
    pytest.mark.slow,
]

ROWS = [
    ("a wonderful moving film", "positive"),
    ("a dull lifeless mess", "negative"),
    ("great acting and a fine story", "positive"),
    ("boring and far too long", "negative"),
    ("the best film this year", "positive"),
]
# Uneven lengths, so the two workers' shares of a step differ in tokens.
RECORDS = [{"input": ROWS[i % 5][0] + " " * (i % 3), "output": ROWS[i % 5][1]} for i in range(40)]
SETTINGS = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.3, "seed": 5}
PROMPT = {"num_virtual_tokens": 4}
# Ray swaps 127.0.0.1 for the machine's external IP unless told the cluster is one machine.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class RayCluster:
    """A one-node Ray cluster on loopback, in its own temp dir, stopped by process id
    (`ray stop` would stop every Ray cluster on the machine)."""

    def __init__(self, num_cpus: int = 4):
        # Short: Ray's unix socket paths must fit in 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.command = [
            *(sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"),
            *("--node-ip-address", "127.0.0.1", "--port", str(self.port)),
            *("--num-cpus", str(num_cpus), "--disable-usage-stats"),
            *("--temp-dir", str(self.temp_dir)),
            # Ray Train frees a cancelled job's placement group through the state API,
            # which the dashboard serves: keep it, on a free loopback port.
            *("--include-dashboard", "true", "--dashboard-host", "127.0.0.1"),
            *("--dashboard-port", str(free_port())),
            *("--dashboard-agent-listen-port", str(free_port())),
            *("--ray-client-server-port", str(free_port())),
        ]
        self.log_file = self.temp_dir / "ray-start.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RayCluster":
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env={**os.environ, **LOOPBACK},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_until_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log_file.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{self.log_file.read_text()[-3000:]}")
            time.sleep(0.2)

    def processes(self, name: str) -> list[psutil.Process]:
        """This cluster's processes whose title contains `name` (e.g. RayTrainWorker)."""
        found = []
        for process in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if name in " ".join(process.cmdline()):
                    found.append(process)
        return found

    def used_cpus(self) -> float:
        status = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "status", "--address", self.address],
            env={**os.environ, **LOOPBACK},
            capture_output=True,
            text=True,
            timeout=60,
        )
        used = re.search(r"([\d.]+)/[\d.]+ CPU", status.stdout)
        assert used, status.stdout + status.stderr
        return float(used.group(1))

    def stop(self) -> None:
        if self.process is None:
            return
        # Leaves first (workers, then raylet and GCS), so each parent reaps its children.
        children = psutil.Process(self.process.pid).children(recursive=True)
        for process in reversed(children):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(children, timeout=10)
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    ray_cluster = RayCluster().start()  # ready by the time the server is: see ray_runtime()
    yield ray_cluster
    ray_cluster.stop()


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory, base_models_dir, cluster):
    server = Runtime(tmp_path_factory.mktemp("ray-runtime"), base_models_dir)
    config = yaml.safe_load(server.config_file.read_text())
    config["model_management"]["trainers"]["default"] = {
        "type": "RAY",
        "import_class": "caikit_tuning.runtime.ray_trainer.RayTrainer",
        "config": {
            "address": cluster.address,
            "num_workers": 2,
            "resources_per_worker": {"CPU": 1, "GPU": 0},
            "use_gpu": False,
            "max_retries": 1,
        },
    }
    server.config_file.write_text(yaml.safe_dump(config))
    server.start()  # meanwhile the cluster starts; the server connects on the first job
    cluster.wait_until_ready()
    yield server
    server.stop()


def test_two_workers_train_a_model_that_serves_and_matches_one_process(ray_runtime, capsys):
    from caikit.core.data_model import DataStream

    from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

    client = ray_runtime.client
    started = time.perf_counter()
    # Global batch 8 = 2 workers x micro-batch 4.
    job = client.train_prompt_tuning(
        "ray-sentiment", "tiny-llama", records=RECORDS, tuning_config=PROMPT,
        accumulate_steps=1, torch_dtype="float32", **SETTINGS,
    )  # fmt: skip
    reasons = []
    final = client.wait(
        job, poll_seconds=0.2, timeout=240, on_status=lambda s: reasons.extend(s.get("reasons", []))
    )
    ray_seconds = time.perf_counter() - started
    assert final["state"] == "COMPLETED", final
    assert any(r.startswith("step ") and "loss" in r and "eta" in r for r in reasons), reasons
    folder = ray_runtime.models / "ray-sentiment"
    result = client.generate("ray-sentiment", RECORDS[0]["input"], max_new_tokens=3)
    assert result["generated_tokens"] >= 1

    # The same global batch in one process: micro-batch 4 x 2 accumulation steps.
    started = time.perf_counter()
    records = [TrainGenerationRecord(**r) for r in RECORDS]
    one = PeftPromptTuning.train(
        "tiny-llama", DataStream.from_iterable(records), TuningConfig(**PROMPT),
        accumulate_steps=2, torch_dtype="float32", **SETTINGS,
    )  # fmt: skip
    one_seconds = time.perf_counter() - started

    logs = [json.loads(line) for line in (folder / "training_logs.jsonl").read_text().splitlines()]
    two_losses = [entry["loss"] for entry in logs if "loss" in entry]
    one_losses = [entry["loss"] for entry in one.training_logs if "loss" in entry]
    assert len(two_losses) == len(one_losses) == 10
    assert two_losses == pytest.approx(one_losses, rel=1e-4, abs=1e-5)
    two = yaml.safe_load((folder / "config.yml").read_text())["training"]
    assert two["global_batch_size"] == one.training_config["global_batch_size"] == 8
    assert two["real_tokens"] == one.training_config["real_tokens"]
    with capsys.disabled():
        print(
            f"\n[ray] 2 Ray Train workers: {ray_seconds:.1f}s submit-to-COMPLETED "
            f"(loop {two['seconds']:.1f}s); 1 process in-process: {one_seconds:.1f}s "
            f"(loop {one.training_config['seconds']:.1f}s)"
        )


def step_of(status) -> int:
    """The step in a RUNNING reason like "step 12/40, loss 0.5, ..."; 0 before any."""
    reasons = status.get("reasons", [])
    found = re.match(r"step (\d+)/", reasons[0]) if reasons else None
    return int(found.group(1)) if found else 0


def wait_for(client, job, condition, deadline):
    status = client.training_status(job)
    while not condition(status):
        assert status["state"] in ("QUEUED", "RUNNING") and time.monotonic() < deadline, status
        time.sleep(0.1)
        status = client.training_status(job)
    return status


def test_a_dead_worker_restarts_from_checkpoints_and_cancel_stops_the_job(ray_runtime, cluster):
    client = ray_runtime.client
    job = client.train_prompt_tuning(
        "ray-cancelled", "tiny-llama", records=RECORDS * 4, tuning_config=PROMPT,
        checkpoint_steps=5, num_epochs=200, batch_size=4,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    wait_for(client, job, lambda s: step_of(s) > 20, deadline)  # checkpoints every 5 steps
    cluster.processes("RayTrainWorker")[1].kill()
    # max_retries: 1 - Ray Train restarts the worker group and the loop resumes.
    wait_for(client, job, lambda s: "restarted after a Ray Train worker" in str(s), deadline)
    assert step_of(wait_for(client, job, step_of, deadline)) >= 20  # not from step 0

    workers = cluster.processes("RayTrainWorker")
    assert len(workers) == 2
    started = time.monotonic()
    assert client.cancel(job)["state"] == "CANCELED"
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive and time.monotonic() - started < 15
    assert client.training_status(job)["state"] == "CANCELED"
    assert not (ray_runtime.models / "ray-cancelled").exists()
    # The job's placement group is released: the cluster's CPUs are free again.
    while cluster.used_cpus() > 0:
        assert time.monotonic() < deadline
        time.sleep(1)


def test_the_reason_names_a_dead_worker_else_the_first_exception(tmp_path):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from caikit_tuning.runtime.ray_trainer import ERROR_FILE, _failure_reason

    # What Ray Train 2.60 reports when rank 1's process is killed mid-step.
    died = WorkerHealthCheckFailedError("metadata=ActorMetadata(pid=4242)", RuntimeError())
    gloo = RuntimeError("Connection closed by peer [127.0.0.1]:30381")
    reason = _failure_reason(tmp_path, WorkerGroupError("failed", {0: gloo, 1: died}))
    assert reason.startswith("the Ray Train worker of rank 1 (pid 4242) died before finishing")
    (tmp_path / ERROR_FILE).write_text("ValueError: no records")
    assert (
        _failure_reason(tmp_path, WorkerGroupError("failed", {0: gloo})) == "ValueError: no records"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_epochs": -1}, "`num_epochs` must be >= 0"),
        ({"base_model": "no-such-model"}, "`base_model` 'no-such-model' was not found"),
        ({"model_name": "../escape"}, "`model_name` '../escape' is not a valid model name"),
    ],
)
def test_bad_requests_are_invalid_argument_at_submission(ray_runtime, overrides, message):
    name = overrides.pop("model_name", "ray-bad")
    base = overrides.pop("base_model", "tiny-llama")
    with pytest.raises(RuntimeCallError) as caught:
        ray_runtime.client.train_prompt_tuning(
            name, base, records=RECORDS, tuning_config=PROMPT, **{**SETTINGS, **overrides}
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    assert not (ray_runtime.models / "ray-bad").exists()
