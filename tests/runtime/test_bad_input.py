"""Bad input against the real server: a specific 4xx / gRPC status, never a 500, and
the server answers a normal request right after."""

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from caikit_tuning import TextGeneration
from caikit_tuning.runtime.client import RuntimeCallError

from .test_training_jobs import RECORDS, assert_serving, tuning


@pytest.fixture(scope="module")
def base_id(runtime):
    TextGeneration.bootstrap("tiny-llama").save(str(runtime.models / "bad-input-base"))
    return "bad-input-base"


def post_raw(runtime, path, data: bytes, content_type="application/json"):
    request = urllib.request.Request(
        f"http://127.0.0.1:{runtime.http_port}{path}",
        data=data,
        headers={"Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


GENERATE = "/api/v1/task/text-generation"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"model_id": "bad-input-base", "inputs": "x", "parameters": {"max_new_tokens": "many"}}',
            (400, 422),
        ),
        (b'{"model_id": "bad-input-base", "inputs": 42}', (400, 422)),
        (
            b'{"model_id": "bad-input-base", "inputs": "x", '
            b'"parameters": {"decoding_method": "SAMPLING", "top_k": -3}}',
            (400,),
        ),
        (b'{"model_id": "bad-input-base", "inputs": "x", "parameters": {"bogus": 1}}', (400, 422)),
        (b'{"model_id": "bad-input-base", "inputs": "x"', (400, 422)),
        (b'{"model_id": "bad-input-base", "inputs": "\xff\xfe"}', (400, 422)),
        (b"", (400, 422)),
        (b'{"inputs": "x"}', (400, 422)),
    ],
)
def test_malformed_rest_requests_are_4xx(runtime, client, base_id, body, expected):
    status, _ = post_raw(runtime, GENERATE, body)
    assert status in expected
    assert_serving(runtime, client)


def test_input_longer_than_the_context_names_the_fix(runtime, client, base_id):
    with pytest.raises(RuntimeCallError) as caught:
        client.generate(base_id, "word " * 3000)
    assert caught.value.code == 400 and "truncate_input_tokens" in caught.value.message
    assert (
        client.generate(base_id, "word " * 3000, truncate_input_tokens=20, max_new_tokens=2)[
            "input_token_count"
        ]
        == 20
    )


def test_ten_megabyte_payloads(runtime, client, base_id):
    huge = "a" * (10 * 2**20)
    status, _ = post_raw(
        runtime, GENERATE, json.dumps({"model_id": base_id, "inputs": huge}).encode()
    )
    assert 400 <= status < 500
    with pytest.raises(RuntimeCallError) as caught:
        client.generate_grpc(base_id, huge)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over gRPC's 4 MB message limit
    assert client.generate(base_id, "", max_new_tokens=2)["generated_tokens"] >= 1  # empty is fine
    assert_serving(runtime, client)


def test_unknown_training_id_is_not_found_over_http(runtime):
    request = urllib.request.Request(
        f"http://127.0.0.1:{runtime.http_port}/management/trainings?training_id=nope"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 404


def test_a_corrupt_model_folder_is_refused_and_others_still_serve(runtime, client, base_id):
    broken = runtime.models / "broken-model"
    broken.mkdir()
    (broken / "config.yml").write_text("module_id: not-a-module\nname: broken\n")
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("broken-model", "x")
    assert 400 <= caught.value.code < 500 or caught.value.code == 404
    partial = runtime.models / "partial-model"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{")
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("partial-model", "x")
    assert caught.value.code in (404, 400)
    assert client.generate(base_id, "the film is", max_new_tokens=2)["generated_tokens"] >= 1


def test_a_job_that_cannot_save_errors_with_the_reason_and_leaves_no_model(runtime, client):
    # A file where the model folder's parent must be: the save fails, atomically.
    (runtime.models / "blocked").write_text("not a folder")
    job = client.train_prompt_tuning(
        "blocked/inner", "tiny-llama", records=RECORDS, **tuning(num_epochs=1)
    )
    final = client.wait(job, poll_seconds=0.3, timeout=120)
    assert final["state"] == "ERRORED"
    assert "Error" in final["reasons"][0]
    # The OS error names the folder by its config key, not by the server's path.
    assert str(runtime.root.resolve()) not in final["reasons"][0]
    assert "<local_models_dir>" in final["reasons"][0] or "blocked" in final["reasons"][0]
    assert (runtime.models / "blocked").is_file()
    assert not list(runtime.models.glob(".staging-*"))
    time.sleep(0.1)
    assert_serving(runtime, client)
