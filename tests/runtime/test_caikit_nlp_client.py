"""caikit-nlp's own client (the caikit-nlp-client release on PyPI) against a server
started from this project's defaults, on causal, seq2seq, prompt-tuned and LoRA models,
including folders saved by caikit-nlp itself."""

import json
import shutil
import urllib.request
from pathlib import Path

import caikit
import grpc
import pytest
from caikit.core.data_model import DataStream
from caikit_nlp_client import GrpcClient, HttpClient
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.json_format import MessageToDict
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from caikit_tuning import LoraTuning, PeftPromptTuning, TrainGenerationRecord, TuningConfig

from .conftest import Runtime

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caikit_nlp"
MODELS = ["tg-causal", "tg-seq2seq", "cnlp-prompt", "cnlp-prompt-seq2seq", "prompt", "lora"]
PARAMS = {"max_new_tokens": 4, "min_new_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose base models are the caikit-nlp fixtures' tiny models, serving
    caikit-nlp's own folders and models trained here on the same bases."""
    root = tmp_path_factory.mktemp("caikit_nlp_client")
    bases = root / "bases"
    shutil.copytree(FIXTURES / "base", bases)
    previous = caikit.get_config().base_models_dir
    caikit.configure(config_dict={"base_models_dir": str(bases)})
    runtime = Runtime(root, bases)
    for folder, name in (
        ("tg_bootstrap_causal", "tg-causal"),
        ("tg_bootstrap_seq2seq", "tg-seq2seq"),
        ("pt_causal_no_base", "cnlp-prompt"),
        ("pt_seq2seq_no_base", "cnlp-prompt-seq2seq"),
    ):
        shutil.copytree(FIXTURES / folder, runtime.models / name)
    records = DataStream.from_iterable(
        [TrainGenerationRecord(input="the movie was great", output="positive")] * 4
    )
    PeftPromptTuning.train(
        "tiny-llama", records, TuningConfig(num_virtual_tokens=3), num_epochs=1
    ).save(str(runtime.models / "prompt"))
    LoraTuning.train("tiny-llama", records, num_epochs=1).save(str(runtime.models / "lora"))
    caikit.configure(config_dict={"base_models_dir": previous})
    runtime.start()
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def clients(server):
    return (
        GrpcClient("localhost", server.grpc_port, insecure=True),
        HttpClient(f"http://localhost:{server.http_port}"),
    )


@pytest.mark.parametrize("model", MODELS)
def test_generate_and_stream_over_grpc_and_http(clients, model):
    over_grpc, over_http = clients
    text = over_grpc.generate_text(model, "the movie was great", **PARAMS)
    assert over_http.generate_text(model, "the movie was great", **PARAMS) == text
    assert "".join(over_grpc.generate_text_stream(model, "the movie was great", **PARAMS)) == text
    chunks = list(over_http.generate_text_stream(model, "the movie was great", **PARAMS))
    assert len(chunks) == 4 and "".join(chunks) == text


def test_a_caikit_nlp_prompt_model_serves_its_tokens(clients):
    # caikit-nlp itself answered "review : the movie was great sentiment : : : : : :".
    expected = json.loads((FIXTURES / "expected.json").read_text())["pt_causal_with_base"]
    text = clients[0].generate_text("cnlp-prompt", "the movie was great", max_new_tokens=5)
    assert expected["generated_text"].endswith(text) and text.strip(" :") == ""


def test_parameter_lists(clients):
    over_grpc, over_http = clients
    grpc_parameters = over_grpc.get_text_generation_parameters()
    http_parameters = over_http.get_text_generation_parameters()
    for parameters in (grpc_parameters, http_parameters):
        assert {"max_new_tokens", "decoding_method", "top_k", "stop_sequences"} <= set(parameters)
        assert set(parameters["exponential_decay_length_penalty"]) == {
            "start_index",
            "decay_factor",
        }
    assert http_parameters["max_new_tokens"] == "integer"


def test_greedy_with_the_sampling_knobs_clients_send(clients):
    over_grpc, over_http = clients
    plain = over_http.generate_text("tg-causal", "the movie", **PARAMS)
    knobs = {"decoding_method": "GREEDY", "top_k": 5, "top_p": 0.9, "temperature": 0.7}
    assert over_http.generate_text("tg-causal", "the movie", **PARAMS, **knobs) == plain
    assert over_grpc.generate_text("tg-causal", "the movie", **PARAMS, **knobs) == plain


def test_unknown_models_are_clean_errors(clients):
    over_grpc, over_http = clients
    for call in (
        lambda: over_grpc.generate_text("no-such-model", "x"),
        lambda: list(over_grpc.generate_text_stream("no-such-model", "x")),
        lambda: over_http.generate_text("no-such-model", "x"),
        lambda: list(over_http.generate_text_stream("no-such-model", "x")),
    ):
        with pytest.raises((RuntimeError, grpc.RpcError)) as caught:
            call()
        assert "no-such-model" in str(caught.value) and "not found" in str(caught.value)


def test_models_info_as_the_newer_client_reads_it(server, clients):
    """caikit-nlp-client's repository (newer than its PyPI release) adds `models_info`:
    GET /info/models, and InfoService/GetModelsInfo found by reflection."""
    clients[1].generate_text("prompt", "x", max_new_tokens=1)
    with urllib.request.urlopen(f"http://localhost:{server.http_port}/info/models") as response:
        over_http = {m["name"]: m for m in json.loads(response.read())["models"]}
    channel = grpc.insecure_channel(f"localhost:{server.grpc_port}")
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("caikit.runtime.info.InfoService")
    method = service.methods_by_name["GetModelsInfo"]
    request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    over_grpc = {m["name"]: m for m in MessageToDict(call(request()))["models"]}
    assert "prompt" in over_http and "prompt" in over_grpc
    assert over_http["prompt"]["module_id"] == PeftPromptTuning.MODULE_ID
    assert not over_http["prompt"]["model_path"].startswith("/")
