"""The OpenAI-compatible routes, driven by the official `openai` package against a real
server on a loopback port."""

import json
import socket
import time
import urllib.request

import openai
import pytest
from caikit.core.data_model import DataStream

from caikit_tuning import PeftPromptTuning, TextGeneration, TrainGenerationRecord, TuningConfig

from .test_training_jobs import RECORDS

VERBALIZER = "Review: {{input}} Sentiment:"


@pytest.fixture(scope="module")
def models(runtime, tiny_llama, tiny_t5):
    TextGeneration.bootstrap("tiny-llama").save(str(runtime.models / "oa-base"))
    TextGeneration.bootstrap("tiny-t5").save(str(runtime.models / "oa-t5"))
    records = DataStream.from_iterable([TrainGenerationRecord(**r) for r in RECORDS])
    PeftPromptTuning.train(
        "tiny-llama",
        records,
        TuningConfig(num_virtual_tokens=3),
        verbalizer=VERBALIZER,
        num_epochs=1,
    ).save(str(runtime.models / "oa-prompt"))
    return runtime


@pytest.fixture(scope="module")
def oai(models):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{models.http_port}/v1", api_key="unused", max_retries=0
    )


def test_models_are_listed_with_their_base(oai):
    listed = {model.id: model for model in oai.models.list()}
    assert {"oa-base", "oa-t5", "oa-prompt"} <= set(listed)
    prompt = listed["oa-prompt"].model_dump()
    assert prompt["owned_by"] == "caikit_tuning" and prompt["object"] == "model"
    assert prompt["parent"] == "tiny-llama" and prompt["root"] == "tiny-llama"
    assert listed["oa-base"].model_dump()["parent"] is None
    assert abs(prompt["created"] - time.time()) < 3600
    assert oai.models.retrieve("oa-prompt").id == "oa-prompt"


def test_a_greedy_completion_is_the_caikit_routes_answer(oai, client):
    for model in ("oa-base", "oa-prompt", "oa-t5"):
        caikit = client.generate(model, "the film is", max_new_tokens=5, min_new_tokens=5)
        answer = oai.completions.create(
            model=model,
            prompt="the film is",
            max_tokens=5,
            temperature=0,
            extra_body={"min_tokens": 5},
        )
        assert answer.choices[0].text == caikit["generated_text"]
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.prompt_tokens == caikit["input_token_count"]
        assert answer.usage.completion_tokens == 5
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5


def test_chat_renders_the_template_around_the_verbalized_user_turn(oai, client):
    messages = [{"role": "user", "content": "a wonderful film"}]
    chat = oai.chat.completions.create(
        model="oa-prompt",
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"min_tokens": 4},
    )
    # The caikit route's apply_chat_template wraps the verbalized text as the user turn.
    caikit = client.generate(
        "oa-prompt",
        "a wonderful film",
        max_new_tokens=4,
        min_new_tokens=4,
        apply_chat_template=True,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == caikit["generated_text"]
    assert chat.object == "chat.completion" and chat.usage.completion_tokens == 4


def test_streams_join_to_the_whole_answer(oai):
    whole = oai.completions.create(model="oa-base", prompt="the film", max_tokens=6, temperature=0)
    stream = oai.completions.create(
        model="oa-base",
        prompt="the film",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = oai.chat.completions.create(
        model="oa-base", messages=messages, max_tokens=5, temperature=0
    )
    deltas = list(
        oai.chat.completions.create(
            model="oa-base", messages=messages, max_tokens=5, temperature=0, stream=True
        )
    )
    assert deltas[0].choices[0].delta.role == "assistant"
    assert (
        "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    )
    assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_sequences_cut_the_answer(oai):
    free = oai.completions.create(
        model="oa-base",
        prompt="the film",
        max_tokens=8,
        temperature=0,
        extra_body={"min_tokens": 8},
    ).choices[0]
    stop = free.text.strip()[2:4]
    assert stop, free.text
    cut = oai.completions.create(
        model="oa-base",
        prompt="the film",
        max_tokens=8,
        temperature=0,
        stop=[stop],
        extra_body={"min_tokens": 1},
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]


def test_n_seeded_samples_and_logprobs(oai):
    def sample():
        return oai.completions.create(
            model="oa-base",
            prompt="the film",
            max_tokens=5,
            temperature=1.0,
            top_p=0.9,
            n=3,
            seed=7,
            logprobs=2,
        )

    first, again = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert (
        first.usage.prompt_tokens
        == oai.completions.create(
            model="oa-base", prompt="the film", max_tokens=1, temperature=0
        ).usage.prompt_tokens
    )
    for choice in first.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
        assert logprobs.text_offset[0] == 0
    chat = oai.chat.completions.create(
        model="oa-base",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # Greedy: the chosen token is the likeliest one.
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)


def test_penalties_and_extra_caikit_parameters_are_accepted(oai):
    answer = oai.completions.create(
        model="oa-base",
        prompt="the film",
        max_tokens=6,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        extra_body={"repetition_penalty": 1.2, "top_k": 5, "truncate_prompt_tokens": 2},
    )
    assert answer.usage.prompt_tokens == 2 and answer.choices[0].text


def test_errors_are_openai_errors_with_their_status(oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert missing.value.code == "model_not_found" and "no-such-model" in missing.value.message
    for bad, param in (
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"extra_body": {"no_such_knob": 1}}, "no_such_knob"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["x"] * 40}, "stop"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            oai.completions.create(model="oa-base", prompt="x", **{"max_tokens": 2, **bad})
        assert refused.value.param == param, refused.value.message
    with pytest.raises(openai.BadRequestError) as untemplated:
        oai.chat.completions.create(
            model="oa-t5", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert "chat template" in untemplated.value.message
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="oa-base", messages=[{"role": "robot", "content": "x"}])


def test_dropped_streams_leave_the_server_serving(oai, models):
    body = json.dumps(
        {
            "model": "oa-base",
            "prompt": "the film",
            "max_tokens": 2000,
            "stream": True,
            "temperature": 0,
            "min_tokens": 2000,
        }
    ).encode()
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", models.http_port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            assert b"data: {" in sock.recv(4096) + sock.recv(4096)
    started = time.monotonic()
    answer = oai.completions.create(
        model="oa-base", prompt="still there?", max_tokens=3, temperature=0
    )
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert time.monotonic() - started < 10
    with urllib.request.urlopen(f"http://127.0.0.1:{models.http_port}/health") as health:
        assert health.status == 200


def test_a_model_trained_over_grpc_is_reachable_by_name(oai, client):
    job = client.train_prompt_tuning(
        "oa-trained",
        "tiny-llama",
        records=RECORDS,
        tuning_config={"num_virtual_tokens": 2},
        num_epochs=1,
        verbalizer=VERBALIZER,
    )
    assert client.wait(job, poll_seconds=0.3, timeout=120)["state"] == "COMPLETED"
    assert "oa-trained" in {model.id for model in oai.models.list()}
    answer = oai.chat.completions.create(
        model="oa-trained",
        messages=[{"role": "user", "content": "a fine film"}],
        max_tokens=2,
        temperature=0,
    )
    assert answer.model == "oa-trained" and answer.usage.completion_tokens >= 1
