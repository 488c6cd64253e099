"""TextGeneration through the real runtime: a bootstrapped base model and a fine-tune job."""

import json
import urllib.request

import pytest

from caikit_tuning import TextGeneration

from .test_training_jobs import RECORDS


@pytest.fixture(scope="module")
def base_model_id(runtime, tiny_llama):
    TextGeneration.bootstrap("tiny-llama").save(str(runtime.models / "tiny-base"))
    return "tiny-base"


def test_bootstrapped_base_model_serves_unary_stream_and_tokens(runtime, client, base_model_id):
    local = TextGeneration.bootstrap("tiny-llama").run(
        "the film is", max_new_tokens=6, min_new_tokens=6
    )
    remote = client.generate(base_model_id, "the film is", max_new_tokens=6, min_new_tokens=6)
    assert remote["generated_text"] == local.generated_text
    chunks = list(client.stream(base_model_id, "the film is", max_new_tokens=6, min_new_tokens=6))
    assert len(chunks) == 6 and "".join(c["generated_text"] for c in chunks) == local.generated_text
    beams = client.generate(base_model_id, "the film is", max_new_tokens=4, num_beams=2)
    assert beams["generated_tokens"] >= 1
    detailed = client.generate(
        base_model_id, "the film is", max_new_tokens=2, include_logprobs=True, include_ranks=True
    )
    assert len(detailed["tokens"]) == 2 and detailed["tokens"][0]["rank"] == 1
    tokens = client.tokenize(base_model_id, "a fine film")
    assert tokens["token_count"] == len(tokens["results"]) > 0
    assert tokens["results"][0]["start"] == 0


def test_fine_tuning_job_over_grpc(runtime, client):
    job = client.train(
        "TextGeneration",
        "tiny-finetuned",
        "tiny-llama",
        records=RECORDS,
        num_epochs=2,
        learning_rate=1e-3,
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    assert (runtime.models / "tiny-finetuned" / "model" / "model.safetensors").is_file()
    result = client.generate("tiny-finetuned", "a wonderful, moving film", max_new_tokens=3)
    assert result["generated_tokens"] >= 1


def test_lora_job_over_grpc_then_serve(runtime, client):
    job = client.train(
        "LoraTuning",
        "tiny-lora",
        "tiny-llama",
        records=RECORDS,
        num_epochs=2,
        adapter_config={"adapter_type": "LORA", "r": 4},
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    assert (runtime.models / "tiny-lora" / "adapter").is_dir()
    result = client.generate("tiny-lora", "a wonderful, moving film", max_new_tokens=3)
    assert result["generated_tokens"] >= 1


def test_models_info_lists_each_kind_and_its_shared_base(runtime, client, base_model_id):
    client.generate(base_model_id, "hello", max_new_tokens=1)
    client.generate("tiny-lora", "hello", max_new_tokens=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{runtime.http_port}/info/models") as response:
        models = {m["name"]: m for m in json.loads(response.read())["models"]}
    assert models["tiny-lora"]["metadata"] == {
        "kind": "lora",
        "base_model": "tiny-llama",
        "shares_base": True,
    }
    assert models[base_model_id]["metadata"]["kind"] == "base"
    assert models[base_model_id]["metadata"]["shares_base"] is True


def test_retraining_a_lora_name_under_load_swaps_it_safely(runtime, client):
    """A stream running on the old adapter while the retrained one is swapped in ends
    on the old weights; requests after the swap get the new ones."""
    text = "a wonderful, moving film"
    before = client.generate("tiny-lora", text, max_new_tokens=24, min_new_tokens=24)
    stream = client.stream("tiny-lora", text, max_new_tokens=24, min_new_tokens=24)
    pieces = [next(stream)["generated_text"]]
    job = client.train(
        "LoraTuning",
        "tiny-lora",
        "tiny-llama",
        records=RECORDS,
        num_epochs=6,
        learning_rate=0.3,
        adapter_config={"adapter_type": "LORA", "r": 4},
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    after = client.generate("tiny-lora", text, max_new_tokens=24, min_new_tokens=24)
    pieces += [chunk["generated_text"] for chunk in stream]
    assert "".join(pieces) == before["generated_text"]
    assert after["generated_text"] != before["generated_text"]


def test_in_context_model_and_labels_over_rest(runtime, client):
    from caikit.core.data_model import DataStream

    from caikit_tuning import InContextLearning

    rows = [
        {"input": "a wonderful film", "output": "positive"},
        {"input": "a dull mess", "output": "negative"},
    ]
    model = InContextLearning.train(
        "tiny-llama",
        DataStream.from_iterable(rows),
        task_description="Sentiment?",
        verbalizer="{{input}} =>",
        num_examples=2,
    )
    model.save(str(runtime.models / "few-shot"))
    local = model.run("a fine film", max_new_tokens=4, min_new_tokens=4).generated_text
    remote = client.generate("few-shot", "a fine film", max_new_tokens=4, min_new_tokens=4)
    assert remote["generated_text"] == local
    labelled = client.generate(
        "few-shot",
        "a fine film",
        max_new_tokens=4,
        labels=["positive", "negative"],
        label_fallback="unsure",
    )
    assert labelled["generated_text"] in ("positive", "negative", "unsure")
