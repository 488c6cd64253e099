"""A server killed mid-training: its worker dies with it, and after a restart finished
models still serve and the interrupted job runs again, resuming from its checkpoint."""

import time

import psutil
import pytest
import yaml

from .conftest import Runtime, worker_processes
from .test_training_jobs import RECORDS, tuning


@pytest.fixture(scope="module")
def restartable(tmp_path_factory, base_models_dir):
    server = Runtime(tmp_path_factory.mktemp("restart"), base_models_dir).start()
    yield server
    server.stop()


def test_kill_the_server_mid_training_then_restart(restartable):
    client = restartable.client
    done = client.train_prompt_tuning(
        "finished-first", "tiny-llama", records=RECORDS, **tuning(num_epochs=1)
    )
    assert client.wait(done, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    expected = client.generate("finished-first", "a fine film", max_new_tokens=4, min_new_tokens=4)[
        "generated_text"
    ]

    job = client.train_prompt_tuning(
        "interrupted",
        "tiny-llama",
        records=RECORDS * 4,
        checkpoint_steps=5,
        **tuning(num_epochs=6),
    )
    deadline = time.monotonic() + 60
    while True:
        reasons = client.training_status(job).get("reasons", [])
        if (
            reasons
            and reasons[0].startswith("step ")
            and int(reasons[0].split()[1].split("/")[0]) > 20
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    workers = worker_processes(restartable)
    assert len(workers) == 1
    restartable.kill()
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() for w in workers), "the worker outlived its server"

    restartable.start()
    client = restartable.client
    status = client.training_status(job)
    assert status["state"] in ("QUEUED", "RUNNING", "COMPLETED"), status
    assert client.training_status(done)["state"] == "COMPLETED"
    assert (
        client.generate("finished-first", "a fine film", max_new_tokens=4, min_new_tokens=4)[
            "generated_text"
        ]
        == expected
    )
    final = client.wait(job, poll_seconds=0.3, timeout=180)
    assert final["state"] == "COMPLETED", final
    config = yaml.safe_load((restartable.models / "interrupted" / "config.yml").read_text())
    assert config["training"]["resumed_from_step"] >= 20
    assert config["training"]["steps"] == 6 * 16
