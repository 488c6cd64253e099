"""A worker that dies is restarted when retries are configured, and resumes from its checkpoint."""

import time

import psutil
import pytest
import yaml

from .conftest import Runtime
from .test_training_jobs import RECORDS, tuning


@pytest.fixture(scope="module")
def retrying_runtime(tmp_path_factory, base_models_dir):
    server = Runtime(
        tmp_path_factory.mktemp("retrying"),
        base_models_dir,
        trainer={"gpus": [], "cpu_slots": 1, "cancel_grace_seconds": 2, "max_retries": 1},
    ).start()
    yield server
    server.stop()


def test_killed_worker_restarts_and_resumes(retrying_runtime):
    client = retrying_runtime.client
    job = client.train_prompt_tuning(
        "resumed", "tiny-llama", records=RECORDS * 4, checkpoint_steps=5, **tuning(num_epochs=15)
    )
    server = psutil.Process(retrying_runtime.process.pid)
    deadline = time.monotonic() + 60
    while True:  # wait for a checkpoint, then kill the worker
        reasons = client.training_status(job).get("reasons", [])
        if (
            reasons
            and reasons[0].startswith("step ")
            and int(reasons[0].split()[1].split("/")[0]) > 20
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [worker] = [
        p for p in server.children() if "caikit_tuning.runtime.worker" in " ".join(p.cmdline())
    ]
    worker.kill()
    final = client.wait(job, poll_seconds=0.3, timeout=180)
    assert final["state"] == "COMPLETED", final
    config = yaml.safe_load((retrying_runtime.models / "resumed" / "config.yml").read_text())
    assert config["training"]["resumed_from_step"] >= 20
    assert config["training"]["steps"] == 15 * 16
