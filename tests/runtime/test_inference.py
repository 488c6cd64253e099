"""Inference through the real runtime: model-id guard, validation, APIs as files."""

import json
import urllib.error
import urllib.request

import grpc
import pytest

from caikit_tuning.runtime.client import RuntimeCallError

from .test_training_jobs import RECORDS, assert_serving, tuning


@pytest.fixture(scope="module")
def served_model(runtime, client):
    job = client.train_prompt_tuning(
        "inference-model", "tiny-llama", records=RECORDS, **tuning(num_epochs=2)
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    return "inference-model"


@pytest.mark.parametrize(
    "model_id", ["../served/inference-model", "/etc", "a/../../b", ".jobs", "~root"]
)
def test_model_ids_outside_the_models_dir_are_refused(runtime, client, served_model, model_id):
    with pytest.raises(RuntimeCallError) as over_http:
        client.generate(model_id, "hello")
    assert over_http.value.code == 400
    with pytest.raises(RuntimeCallError) as over_grpc:
        client.generate_grpc(model_id, "hello")
    assert over_grpc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_id" in over_grpc.value.message
    assert_serving(runtime, client)


def test_unknown_model_is_not_found(runtime, client):
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("never-trained", "hello")
    assert caught.value.code == 404


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1"),
        ({"num_beams": 2, "decoding_method": "SAMPLING"}, "`num_beams` > 1 is beam search"),
        ({"decoding_method": "SAMPLING", "top_p": 2.0}, "`top_p` must be in (0, 1]"),
        ({"min_new_tokens": 9, "max_new_tokens": 3}, "must not exceed"),
        ({"stop_sequences": [""]}, "non-empty strings"),
    ],
)
def test_bad_generation_parameters_are_400_naming_the_field(
    runtime, client, served_model, parameters, message
):
    with pytest.raises(RuntimeCallError) as caught:
        client.generate(served_model, "hello", **parameters)
    assert caught.value.code == 400 and message in caught.value.message
    with pytest.raises(RuntimeCallError) as over_grpc:
        client.generate_grpc(served_model, "hello", **parameters)
    assert over_grpc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(runtime, client)


def test_every_generation_parameter_travels(runtime, client, served_model):
    sampled = client.generate(
        served_model,
        "a fine film",
        max_new_tokens=6,
        min_new_tokens=6,
        decoding_method="SAMPLING",
        top_k=20,
        top_p=0.9,
        typical_p=0.95,
        temperature=0.8,
        seed=5,
        repetition_penalty=1.2,
        max_time=10.0,
        exponential_decay_length_penalty={"start_index": 100, "decay_factor": 1.01},
        truncate_input_tokens=50,
        preserve_input_text=True,
    )
    again = client.generate_grpc(
        served_model,
        "a fine film",
        max_new_tokens=6,
        min_new_tokens=6,
        decoding_method="SAMPLING",
        top_k=20,
        top_p=0.9,
        typical_p=0.95,
        temperature=0.8,
        seed=5,
        repetition_penalty=1.2,
        max_time=10.0,
        exponential_decay_length_penalty={"start_index": 100, "decay_factor": 1.01},
        truncate_input_tokens=50,
        preserve_input_text=True,
    )
    assert sampled["generated_text"] == again["generated_text"]
    assert sampled["generated_text"].startswith("Review: a fine film Sentiment:")
    assert int(sampled["seed"]) == 5 and sampled["generated_tokens"] == 6


def test_openapi_has_our_title_and_no_dangling_refs(runtime):
    with urllib.request.urlopen(f"http://127.0.0.1:{runtime.http_port}/openapi.json") as response:
        spec = json.loads(response.read())
    assert spec["info"]["title"] != "FastAPI"
    text = json.dumps(spec)
    refs = {ref for ref in _refs(spec)}
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
    assert "/api/v1/task/text-generation" in text


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_only_loopback_listeners(runtime):
    import psutil

    server = psutil.Process(runtime.process.pid)
    # caikit pins psutil < 6, where the method is still called connections().
    connections = getattr(server, "net_connections", None) or server.connections
    listening = [c for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    assert {runtime.grpc_port, runtime.http_port, runtime.metrics_port} <= ports
    for conn in listening:
        assert conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), conn
