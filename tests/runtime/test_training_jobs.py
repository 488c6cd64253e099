"""Training jobs through the real runtime: submit, watch, cancel, queue, serve the result."""

import json
import time

import psutil
import pytest

from caikit_tuning.runtime.client import RuntimeCallError

from .conftest import worker_processes

RECORDS = [
    {"input": "a wonderful, moving film", "output": "positive"},
    {"input": "a dull and lifeless mess", "output": "negative"},
] * 8


def tuning(**overrides):
    params = {
        "tuning_config": {"num_virtual_tokens": 4},
        "num_epochs": 10,
        "batch_size": 4,
        "learning_rate": 0.3,
        "verbalizer": "Review: {{input}} Sentiment:",
    }
    params.update(overrides)
    return params


def test_train_then_serve_over_rest_and_sse(runtime, client):
    job = client.train_prompt_tuning("sentiment", "tiny-llama", records=RECORDS, **tuning())
    final = client.wait(job, poll_seconds=0.3, timeout=120)
    assert final["state"] == "COMPLETED", final
    assert (runtime.models / "sentiment" / "adapter_model.safetensors").is_file()
    result = client.generate("sentiment", "a wonderful, moving film", max_new_tokens=3)
    assert result["generated_tokens"] >= 1 and result["finish_reason"] in (
        "MAX_TOKENS",
        "EOS_TOKEN",
    )
    chunks = list(client.stream("sentiment", "a wonderful, moving film", max_new_tokens=3))
    assert len(chunks) == result["generated_tokens"]
    assert "".join(c["generated_text"] for c in chunks) == result["generated_text"]
    assert (
        client.generate_grpc("sentiment", "a wonderful, moving film", max_new_tokens=3)[
            "generated_text"
        ]
        == result["generated_text"]
    )
    grpc_chunks = list(
        client.stream_grpc("sentiment", "a wonderful, moving film", max_new_tokens=3)
    )
    assert "".join(c.get("generated_text", "") for c in grpc_chunks) == result["generated_text"]


def test_train_from_a_jsonl_file(runtime, client):
    (runtime.data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    job = client.train_prompt_tuning(
        "from-file", "tiny-llama", file="train.jsonl", **tuning(num_epochs=1)
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"


def test_cancel_stops_the_worker_process(runtime, client):
    job = client.train_prompt_tuning(
        "cancelled", "tiny-llama", records=RECORDS * 40, **tuning(num_epochs=200)
    )
    deadline = time.monotonic() + 60
    while client.training_status(job)["state"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    server = psutil.Process(runtime.process.pid)
    workers = [
        p for p in server.children() if "caikit_tuning.runtime.worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1
    started = time.monotonic()
    assert client.cancel(job)["state"] == "CANCELED"
    psutil.wait_procs(workers, timeout=10)
    assert not workers[0].is_running()
    assert time.monotonic() - started < 10
    assert client.training_status(job)["state"] == "CANCELED"
    assert not (runtime.models / "cancelled").exists()


def test_jobs_queue_behind_a_busy_slot(runtime, client):
    first = client.train_prompt_tuning(
        "first", "tiny-llama", records=RECORDS, **tuning(num_epochs=30)
    )
    second = client.train_prompt_tuning(
        "second", "tiny-llama", records=RECORDS, **tuning(num_epochs=1)
    )
    states = set()
    deadline = time.monotonic() + 120
    while True:
        # The second job's state first: once it runs, the first has ended, so a first
        # read after it cannot be a stale RUNNING (the other order could).
        b = client.training_status(second)["state"]
        a = client.training_status(first)["state"]
        states.add((a, b))
        # One CPU slot: the second job never runs while the first one does.
        assert not (a == "RUNNING" and b == "RUNNING")
        if a == "COMPLETED" and b == "COMPLETED":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ("RUNNING", "QUEUED") in states


def test_progress_is_reported_while_running(runtime, client):
    job = client.train_prompt_tuning(
        "watched", "tiny-llama", records=RECORDS * 10, **tuning(num_epochs=20)
    )
    deadline = time.monotonic() + 120
    while not any(
        reason.startswith("step ") and "eta" in reason
        for reason in client.training_status(job).get("reasons", [])
    ):
        assert time.monotonic() < deadline, client.training_status(job)
        time.sleep(0.2)
    client.cancel(job)  # seen: no need to train it to the end
    assert client.wait(job, poll_seconds=0.2, timeout=30)["state"] == "CANCELED"


def test_a_killed_worker_errors_the_job_and_the_next_job_runs(runtime, client):
    job = client.train_prompt_tuning(
        "doomed", "tiny-llama", records=RECORDS, **tuning(num_epochs=200)
    )
    deadline = time.monotonic() + 60
    while not (workers := worker_processes(runtime)):
        assert client.training_status(job)["state"] in ("QUEUED", "RUNNING")
        assert time.monotonic() < deadline, client.training_status(job)
        time.sleep(0.2)
    [worker] = workers
    worker.kill()
    final = client.wait(job, poll_seconds=0.2, timeout=30)
    assert final["state"] == "ERRORED"
    assert "died (signal 9)" in final["reasons"][0]
    # The next job still runs.
    job = client.train_prompt_tuning(
        "after-crash", "tiny-llama", records=RECORDS, **tuning(num_epochs=1)
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_model": "no-such-model"}, "`base_model` 'no-such-model' was not found"),
        ({"base_model": "../outside"}, "must not contain '..'"),
        ({"base_model": "/etc"}, "absolute paths are not allowed"),
        ({"records": None}, "`train_stream` is required"),
        ({"tuning_type": "LORA"}, "`tuning_type` must be one of"),
        ({"verbalizer": "no placeholder"}, "names no field"),
        (
            {"tuning_config": {"num_virtual_tokens": 0}},
            "`tuning_config.num_virtual_tokens` must be",
        ),
        (
            {"tuning_config": {"num_virtual_tokens": 2, "prompt_tuning_init_method": "BOGUS"}},
            "prompt_tuning_init_method` must be one of",
        ),
        ({"num_epochs": -1}, "`num_epochs` must be >= 0"),
        ({"batch_size": -4}, "`batch_size` must be >= 1"),
        ({"model_name": "../escape"}, "`model_name` '../escape' is not a valid model name"),
        ({"model_name": "/abs"}, "`model_name` '/abs' is not a valid model name"),
        ({"file": "../secret.jsonl", "records": None}, "must not contain '..'"),
        ({"file": "/etc/passwd", "records": None}, "absolute paths"),
    ],
)
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(
    runtime, client, overrides, message
):
    import grpc

    params = tuning()
    name = overrides.pop("model_name", "bad")
    base = overrides.pop("base_model", "tiny-llama")
    data = {"records": RECORDS}
    for key in ("records", "file"):
        if key in overrides:
            data[key] = overrides.pop(key)
    data = {k: v for k, v in data.items() if v is not None}
    params.update(overrides)
    with pytest.raises(RuntimeCallError) as caught:
        client.train_prompt_tuning(name, base, **data, **params)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    assert not (runtime.models / "bad").exists()
    assert_serving(runtime, client)


def assert_serving(runtime, client):
    """The server still answers HTTP and gRPC."""
    import urllib.request

    import grpc

    with urllib.request.urlopen(f"http://127.0.0.1:{runtime.http_port}/health") as response:
        assert response.status == 200
    with pytest.raises(RuntimeCallError) as caught:
        client.training_status("no-such-training")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_retraining_a_model_name_serves_the_new_model(runtime, client):
    first = client.train_prompt_tuning(
        "retrained", "tiny-llama", records=RECORDS, **tuning(num_epochs=1, seed=1)
    )
    assert client.wait(first, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    before = client.generate("retrained", "a fine film", max_new_tokens=8, min_new_tokens=8)
    second = client.train_prompt_tuning(
        "retrained",
        "tiny-llama",
        records=RECORDS,
        **tuning(num_epochs=20, seed=2, learning_rate=1.0),
    )
    assert client.wait(second, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    after = client.generate("retrained", "a fine film", max_new_tokens=8, min_new_tokens=8)
    assert after["generated_text"] != before["generated_text"]


def _post(runtime, path, body):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{runtime.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_training_over_http(runtime, client):
    (runtime.data / "http.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    parameters = {
        "base_model": "tiny-llama",
        "tuning_config": {"num_virtual_tokens": 2},
        "num_epochs": 1,
        "train_stream": {"data_stream": {"filename": "http.jsonl"}},
    }
    status, body = _post(
        runtime,
        "/api/v1/TextGenerationTaskPeftPromptTuningTrain",
        {"model_name": "via-http", "parameters": parameters},
    )
    assert status == 200, body
    assert client.wait(body["training_id"], poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    del parameters["train_stream"]
    status, body = _post(
        runtime,
        "/api/v1/TextGenerationTaskPeftPromptTuningTrain",
        {"model_name": "no-data", "parameters": parameters},
    )
    assert status == 400 and "`train_stream` is required" in body["details"]


def test_training_files_csv_and_malformed(runtime, client):
    import grpc

    (runtime.data / "train.csv").write_text(
        "input,output\n" + "\n".join(f'"{r["input"]}",{r["output"]}' for r in RECORDS)
    )
    job = client.train_prompt_tuning(
        "from-csv", "tiny-llama", file="train.csv", **tuning(num_epochs=1)
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    (runtime.data / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json}\n")
    with pytest.raises(RuntimeCallError) as caught:
        client.train_prompt_tuning("broken", "tiny-llama", file="broken.jsonl", **tuning())
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.jsonl line 2: invalid JSON" in caught.value.message
    (runtime.data / "no-output.jsonl").write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(RuntimeCallError) as caught:
        client.train_prompt_tuning("no-output", "tiny-llama", file="no-output.jsonl", **tuning())
    assert "record 0 has no string `output`" in caught.value.message
