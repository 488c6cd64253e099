"""TextGeneration on tiny real models: bootstrap, generation options, fine-tuning, reload."""

import json
import subprocess
import sys

import pytest
import torch
from caikit.core.data_model import DataStream
from caikit.interfaces.nlp.data_model import FinishReason

from caikit_tuning import TextGeneration, TrainGenerationRecord

PROMPT = "the film is"


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return TextGeneration.bootstrap(str(tiny_llama))


@pytest.fixture(scope="module")
def t5(tiny_t5):
    return TextGeneration.bootstrap("tiny-t5")


def hf_generate(model, text, **options):
    ids = model.base.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.base.model.generate(**ids, do_sample=False, **options)[0]
    if not model.base.is_encoder_decoder:
        out = out[ids["input_ids"].shape[1] :]
    return model.base.tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_greedy_matches_transformers_generate(which, llama, t5):
    model = llama if which == "llama" else t5
    ours = model.run(PROMPT, max_new_tokens=10, min_new_tokens=10)
    assert ours.generated_text == hf_generate(model, PROMPT, max_new_tokens=10, min_new_tokens=10)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_beam_search_matches_transformers(which, llama, t5):
    model = llama if which == "llama" else t5
    ours = model.run(PROMPT, max_new_tokens=8, min_new_tokens=8, num_beams=3)
    theirs = hf_generate(
        model, PROMPT, max_new_tokens=8, min_new_tokens=8, num_beams=3, early_stopping=True
    )
    assert ours.generated_text == theirs
    assert ours.generated_tokens == 8 and ours.finish_reason == FinishReason.MAX_TOKENS
    stream = list(model.run_stream_out(PROMPT, max_new_tokens=8, min_new_tokens=8, num_beams=3))
    assert len(stream) == 1 and stream[0].generated_text == theirs


def test_beam_search_refuses_sampling(llama):
    with pytest.raises(ValueError, match="beam search, which needs decoding_method GREEDY"):
        llama.run(PROMPT, num_beams=2, decoding_method="SAMPLING")


def test_tokenization_task_gives_offsets(llama):
    result = llama.run_tokenizer("a fine film")
    assert result.token_count == len(result.results) > 0
    assert "".join(token.text for token in result.results) == "a fine film"
    for token in result.results:
        assert "a fine film"[token.start : token.end] == token.text


def test_chat_template_is_applied_on_request(llama, t5):
    with pytest.raises(ValueError, match="has no chat template"):
        t5.run("hi", apply_chat_template=True)
    chat = llama.run("hi", apply_chat_template=True, preserve_input_text=True, max_new_tokens=2)
    assert chat.generated_text.startswith("<s>user\nhi</s>\n<s>assistant\n")
    templated = "<s>user\nhi</s>\n<s>assistant\n"
    assert chat.input_token_count == len(
        llama.base.tokenizer(templated, add_special_tokens=False)["input_ids"]
    )


def test_bootstrapped_model_saves_a_reference_and_reloads(llama, tmp_path):
    llama.save(str(tmp_path / "served"))
    assert sorted(p.name for p in (tmp_path / "served").iterdir()) == ["config.yml"]
    loaded = TextGeneration.load(str(tmp_path / "served"))
    assert (
        loaded.run(PROMPT, max_new_tokens=6).generated_text
        == llama.run(PROMPT, max_new_tokens=6).generated_text
    )


def records(n=16):
    rows = [
        {"input": "a wonderful moving film", "output": "positive"},
        {"input": "a dull lifeless mess", "output": "negative"},
    ]
    return [TrainGenerationRecord(**rows[i % 2]) for i in range(n)]


def finetune(base="tiny-llama", **options):
    settings = {
        "num_epochs": 4,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "verbalizer": "Review: {{input}} Sentiment:",
    }
    settings.update(options)
    return TextGeneration.train(base, DataStream.from_iterable(records()), **settings)


RELOAD = """
import json, sys, caikit, caikit_tuning
caikit.configure(config_dict={"base_models_dir": sys.argv[2]})
model = caikit.load(sys.argv[1])
print(json.dumps(model.run("a wonderful moving film", max_new_tokens=6, min_new_tokens=6).generated_text))
"""


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-t5"])
def test_fine_tuning_lowers_loss_and_reloads_identically(base, base_models_dir, tmp_path):
    model = finetune(base)
    losses = [e["loss"] for e in model.training_logs if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    expected = model.run(
        "a wonderful moving film", max_new_tokens=6, min_new_tokens=6
    ).generated_text
    model.save(str(tmp_path / "tuned"))
    files = sorted(p.name for p in (tmp_path / "tuned").iterdir())
    assert files == ["config.yml", "model", "training_curve.png", "training_logs.jsonl"]
    assert (tmp_path / "tuned" / "model" / "model.safetensors").is_file()
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "tuned"), str(base_models_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_every_training_knob_takes_effect(base_models_dir):
    base = finetune(num_epochs=1)
    steps = lambda model: model.training_config["steps"]  # noqa: E731
    assert steps(base) == 4
    assert steps(finetune(num_epochs=1, accumulate_steps=2)) == 2
    assert steps(finetune(num_epochs=1, batch_size=8)) == 2
    assert steps(finetune(num_epochs=2)) == 8
    weights = lambda model: model.base.model.lm_head.weight  # noqa: E731
    assert not torch.equal(weights(base), weights(finetune(num_epochs=1, seed=3)))
    assert not torch.equal(weights(base), weights(finetune(num_epochs=1, learning_rate=1e-2)))
    short = finetune(num_epochs=1, max_source_length=3)
    assert short.training_config["real_tokens"] < base.training_config["real_tokens"]
    one = finetune(num_epochs=1, max_target_length=2)  # the label is cut to EOS only
    assert one.training_config["real_tokens"] < base.training_config["real_tokens"]
    checkpointed = finetune(num_epochs=1, gradient_checkpointing=True)
    assert torch.allclose(weights(checkpointed), weights(base), atol=1e-4)
    assert finetune(num_epochs=1, verbalizer="{{input}} =>").model_input("x") == "x =>"
