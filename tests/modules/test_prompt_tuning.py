"""Prompt tuning end to end on tiny real models: train, run, stream, save, load."""

import json
import subprocess
import sys

import caikit
import pytest
import torch
from caikit.core.data_model import DataStream
from caikit.interfaces.nlp.data_model import FinishReason

from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

VERBALIZER = "Review: {{input}} Sentiment:"


def records(rows, n):
    return [TrainGenerationRecord(input=r["input"], output=r["output"]) for r in rows[:n]]


def tune(base, rows, n=48, **kwargs):
    options = {
        "tuning_config": TuningConfig(num_virtual_tokens=4),
        "num_epochs": 2,
        "batch_size": 8,
        "verbalizer": VERBALIZER,
        "max_source_length": 48,
        "seed": 7,
    }
    options.update(kwargs)
    return PeftPromptTuning.train(base, DataStream.from_iterable(records(rows, n)), **options)


@pytest.fixture(scope="module")
def llama_model(tiny_llama, train_rows):
    return tune("tiny-llama", train_rows)


@pytest.fixture(scope="module")
def t5_model(tiny_t5, train_rows):
    return tune("tiny-t5", train_rows)


def test_loss_goes_down(tiny_llama, train_rows):
    # One repeated record: the prompt alone must learn to produce its label.
    rows = [{"input": "a wonderful and moving film", "output": "positive"}] * 16
    model = tune("tiny-llama", rows, n=16, num_epochs=25, learning_rate=0.3)
    losses = [entry["loss"] for entry in model.training_logs if "loss" in entry]
    assert len(losses) == 50
    assert losses[-1] < 0.5 * losses[0]
    assert model.run("a wonderful and moving film", max_new_tokens=4).generated_text.startswith(
        "positive"
    )


def test_same_seed_same_prompt_vectors(tiny_llama, train_rows):
    first = tune("tiny-llama", train_rows, n=16, num_epochs=1)
    second = tune("tiny-llama", train_rows, n=16, num_epochs=1)
    third = tune("tiny-llama", train_rows, n=16, num_epochs=1, seed=8)
    assert torch.equal(first.prompt.weight, second.prompt.weight)
    assert not torch.equal(first.prompt.weight, third.prompt.weight)


def test_accumulation_matches_one_big_batch(tiny_llama, train_rows):
    # Two micro-batches of 4 per step give the same update as one batch of 8.
    big = tune("tiny-llama", train_rows, n=16, num_epochs=1, batch_size=8, learning_rate=0.1)
    acc = tune(
        "tiny-llama",
        train_rows,
        n=16,
        num_epochs=1,
        batch_size=4,
        accumulate_steps=2,
        learning_rate=0.1,
    )
    assert len([e for e in acc.training_logs if "loss" in e]) == 2
    # Length grouping orders examples differently per batch size; compare the losses.
    assert acc.training_logs[0]["loss"] == pytest.approx(big.training_logs[0]["loss"], rel=0.15)


def test_text_init_starts_from_the_text_embeddings(tiny_llama, train_rows):
    model = tune(
        "tiny-llama",
        train_rows,
        n=8,
        num_epochs=1,
        learning_rate=1e-9,
        tuning_config=TuningConfig(
            num_virtual_tokens=3,
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text="positive",
        ),
    )
    tokenizer = model.base.tokenizer
    ids = tokenizer("positive", add_special_tokens=False)["input_ids"]
    expected = model.base.model.get_input_embeddings().weight[torch.tensor((ids * 3)[:3])]
    assert torch.allclose(model.prompt.weight, expected.float(), atol=1e-5)


def test_label_init_starts_from_the_labels_then_common_tokens(tiny_llama, train_rows):
    from caikit_tuning.modules.prompt_tuning.soft_prompt import COMMON_TOKENS, label_token_ids

    rows = train_rows[:8]
    model = tune(
        "tiny-llama",
        rows,
        n=8,
        num_epochs=1,
        learning_rate=1e-9,
        tuning_config=TuningConfig(num_virtual_tokens=6, prompt_tuning_init_method="LABELS"),
    )
    tokenizer, embeddings = model.base.tokenizer, model.base.model.get_input_embeddings().weight
    labels = label_token_ids(tokenizer, [row["output"] for row in rows])
    assert 0 < len(labels) < 6
    expected = embeddings[torch.tensor(labels)].float()
    assert torch.allclose(model.prompt.weight[: len(labels)], expected, atol=1e-5)
    # The rest are token embeddings too, from the vocabulary's first (common) tokens.
    common = embeddings[: min(COMMON_TOKENS, embeddings.shape[0])].float()
    for row in model.prompt.weight[len(labels) :]:
        assert torch.isclose(common, row, atol=1e-5).all(dim=1).any()
    assert label_token_ids(tokenizer, ["b", "a", "a"])[0] == label_token_ids(tokenizer, ["a"])[0]


def test_validation_loss_is_logged_per_epoch(tiny_llama, train_rows):
    model = tune(
        "tiny-llama",
        train_rows,
        n=16,
        num_epochs=2,
        val_stream=DataStream.from_iterable(records(train_rows[100:], 8)),
    )
    validation = [e for e in model.training_logs if "validation_loss" in e]
    assert [e["epoch"] for e in validation] == [1, 2]


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_streaming_yields_per_token_and_joins_to_unary(which, llama_model, t5_model):
    model = llama_model if which == "llama" else t5_model
    unary = model.run("a fine film", max_new_tokens=6, min_new_tokens=6)
    chunks = list(model.run_stream_out("a fine film", max_new_tokens=6, min_new_tokens=6))
    assert len(chunks) == 6
    assert "".join(c.generated_text for c in chunks) == unary.generated_text
    assert chunks[-1].details.finish_reason == FinishReason.MAX_TOKENS
    assert chunks[0].details.finish_reason == FinishReason.NOT_FINISHED
    assert unary.generated_tokens == 6 and unary.finish_reason == FinishReason.MAX_TOKENS
    expected_input = len(
        model.base.tokenizer(model.verbalizer.render({"input": "a fine film"}))["input_ids"]
    )
    assert unary.input_token_count == expected_input


def test_stream_is_produced_while_generating(llama_model):
    # The first message arrives before the rest is computed: the stream is lazy.
    stream = iter(llama_model.run_stream_out("a fine film", max_new_tokens=50, min_new_tokens=50))
    first = next(stream)
    assert first.details.generated_tokens == 1
    assert sum(1 for _ in stream) == 49


EXPECTED_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.yml",
    "training_curve.png",
    "training_logs.jsonl",
]

RUN_IN_FRESH_PROCESS = """
import json, sys, caikit, caikit_tuning
caikit.configure(config_dict={"base_models_dir": sys.argv[2]})
model = caikit.load(sys.argv[1])
result = model.run("a fine film", max_new_tokens=8, min_new_tokens=8)
print(json.dumps({"text": result.generated_text, "cls": type(model).__name__}))
"""


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_save_then_load_in_a_fresh_process_gives_identical_output(
    which, llama_model, t5_model, tmp_path, base_models_dir
):
    model = llama_model if which == "llama" else t5_model
    folder = tmp_path / "saved"
    model.save(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == EXPECTED_FILES
    expected = model.run("a fine film", max_new_tokens=8, min_new_tokens=8).generated_text
    out = subprocess.run(
        [sys.executable, "-c", RUN_IN_FRESH_PROCESS, str(folder), str(base_models_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"text": expected, "cls": "PeftPromptTuning"}
    logs = [json.loads(line) for line in (folder / "training_logs.jsonl").read_text().splitlines()]
    assert logs == model.training_logs


def test_saved_config_records_base_model_by_name(llama_model, tmp_path):
    import yaml

    llama_model.save(str(tmp_path / "m"))
    config = yaml.safe_load((tmp_path / "m" / "config.yml").read_text())
    assert config["base_model"] == {"name": "tiny-llama"}
    assert config["verbalizer"] == VERBALIZER
    assert config["output_model_types"] == ["DECODER"]
    assert config["training"]["learning_rate"] == 0.3


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(
    which, llama_model, t5_model, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model = llama_model if which == "llama" else t5_model
    model.save(str(tmp_path / "m"))
    folder = model.base.source
    auto = AutoModelForSeq2SeqLM if which == "t5" else AutoModelForCausalLM
    base_dir = caikit.get_config().base_models_dir + "/" + folder.name
    peft_model = PeftModel.from_pretrained(
        auto.from_pretrained(base_dir), str(tmp_path / "m")
    ).eval()
    tokenizer = model.base.tokenizer
    ids = tokenizer(["Review: a fine film Sentiment:"], return_tensors="pt")
    with torch.no_grad():
        if which == "t5":
            decoder_ids = torch.tensor([[0, 5, 6]])
            theirs = peft_model(**ids, decoder_input_ids=decoder_ids).logits
            embeds, mask = _embed(model, ids, "encoder")
            ours = model.base.model(
                inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids
            ).logits
        else:
            theirs = peft_model(**ids).logits
            embeds, mask = _embed(model, ids, "decoder")
            ours = model.base.model(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.allclose(theirs, ours, atol=1e-5)


def _embed(model, ids, where):
    from caikit_tuning.inputs import embed_with_prefix

    vectors = getattr(model.prompt.prefix(), where)
    return embed_with_prefix(model.base.model, ids["input_ids"], ids["attention_mask"], vectors)


@pytest.mark.parametrize("types", [["ENCODER"], ["DECODER"], ["ENCODER", "DECODER"]])
def test_seq2seq_prompt_placements_all_train_and_reload(types, tiny_t5, train_rows, tmp_path):
    model = tune(
        "tiny-t5",
        train_rows,
        n=16,
        num_epochs=1,
        tuning_config=TuningConfig(num_virtual_tokens=3, output_model_types=types),
    )
    prefix = model.prompt.prefix()
    assert (prefix.encoder is not None) == ("ENCODER" in types)
    assert (prefix.decoder is not None) == ("DECODER" in types)
    assert model.prompt.weight.shape[0] == 3 * len(types)
    expected = model.run("fine", max_new_tokens=5, min_new_tokens=5).generated_text
    model.save(str(tmp_path / "m"))
    loaded = PeftPromptTuning.load(str(tmp_path / "m"))
    assert loaded.run("fine", max_new_tokens=5, min_new_tokens=5).generated_text == expected


def test_load_names_the_missing_base_model(llama_model, tmp_path):
    import yaml

    folder = tmp_path / "m"
    llama_model.save(str(folder))
    config = yaml.safe_load((folder / "config.yml").read_text())
    config["base_model"] = {"name": "no-such-model"}
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="no-such-model.*not found"):
        PeftPromptTuning.load(str(folder))


def test_failed_save_leaves_no_folder(llama_model, tmp_path, monkeypatch):
    from caikit_tuning.modules.prompt_tuning import peft_prompt_tuning

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_prompt_tuning, "write_training_artifacts", broken)
    with pytest.raises(OSError, match="disk full"):
        llama_model.save(str(tmp_path / "m"))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_model(llama_model, tmp_path, monkeypatch):
    from caikit_tuning.modules.prompt_tuning import peft_prompt_tuning

    llama_model.save(str(tmp_path / "m"))
    before = (tmp_path / "m" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(
        peft_prompt_tuning, "save_adapter", lambda *a, **k: (_ for _ in ()).throw(OSError("x"))
    )
    with pytest.raises(OSError):
        llama_model.save(str(tmp_path / "m"))
    assert (tmp_path / "m" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
