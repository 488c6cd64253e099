"""Two processes with gloo give the same training as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

RUN = """
import json, os, sys
import caikit, caikit_tuning, torch
import torch.distributed as dist
from caikit.core.data_model import DataStream
from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.training.distributed import init_from_env
torch.set_num_threads(1)
caikit.configure(config_dict={"base_models_dir": sys.argv[1]})
world = init_from_env()
rows = [("a wonderful moving film", "positive"), ("a dull lifeless mess", "negative"),
        ("great acting and a fine story", "positive"), ("boring and far too long", "negative"),
        ("the best film this year", "positive")]
records = [TrainGenerationRecord(input=rows[i % 5][0] + " " * (i % 3), output=rows[i % 5][1]) for i in range(40)]
model = PeftPromptTuning.train("tiny-llama", DataStream.from_iterable(records), TuningConfig(num_virtual_tokens=4),
    num_epochs=2, batch_size=4, accumulate_steps=int(sys.argv[3]), learning_rate=0.3, seed=5,
    torch_dtype="float32")
if world.is_main:
    losses = [e["loss"] for e in model.training_logs if "loss" in e]
    json.dump({"losses": losses, "prompt": model.prompt.weight.tolist(), "world": world.size,
               "config": model.training_config}, open(sys.argv[2], "w"))
if world.size > 1:
    dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one_process(base_models_dir, tmp_path):
    single = subprocess.run(
        [sys.executable, "-c", RUN, str(base_models_dir), str(tmp_path / "one.json"), "2"],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RUN, str(base_models_dir), str(tmp_path / "two.json"), "1"],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (
        two["world"] == 2
        and two["config"]["global_batch_size"] == one["config"]["global_batch_size"] == 8
    )
    assert two["config"]["steps"] == one["config"]["steps"] == 10
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    flat_one = [v for row in one["prompt"] for v in row]
    flat_two = [v for row in two["prompt"] for v in row]
    assert flat_two == pytest.approx(flat_one, rel=1e-3, abs=1e-4)
    assert two["config"]["real_tokens"] == one["config"]["real_tokens"]
