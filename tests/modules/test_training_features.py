"""Validation, early stopping, schedules and resumable checkpoints, through real training."""

import signal
import subprocess
import sys

import pytest
import torch
from caikit.core.data_model import DataStream

from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.training import checkpointing

ROWS = [
    {"input": "a wonderful moving film", "output": "positive"},
    {"input": "a dull lifeless mess", "output": "negative"},
    {"input": "great acting and a fine story", "output": "positive"},
    {"input": "boring and far too long", "output": "negative"},
]


def records(n):
    return [TrainGenerationRecord(**ROWS[i % len(ROWS)]) for i in range(n)]


def tune(n=32, **options):
    settings = {
        "tuning_config": TuningConfig(num_virtual_tokens=4),
        "num_epochs": 4,
        "batch_size": 4,
        "learning_rate": 0.3,
        "verbalizer": "Review: {{input}} Sentiment:",
        "seed": 3,
    }
    settings.update(options)
    return PeftPromptTuning.train("tiny-llama", DataStream.from_iterable(records(n)), **settings)


def test_validation_split_logs_loss_perplexity_and_accuracy(base_models_dir):
    model = tune(validation={"split_ratio": 0.25, "accuracy_examples": 4})
    assert model.training_config["num_records"] == 24
    validations = [e for e in model.training_logs if "validation_loss" in e]
    assert [e["epoch"] for e in validations] == [1, 2, 3, 4]
    for entry in validations:
        assert entry["validation_perplexity"] == pytest.approx(
            2.718281828 ** entry["validation_loss"], rel=1e-3
        )
        assert 0.0 <= entry["validation_accuracy"] <= 1.0


def test_eval_steps_validate_mid_epoch(base_models_dir):
    model = tune(val_stream=DataStream.from_iterable(records(8)), validation={"eval_steps": 3})
    assert [e["step"] for e in model.training_logs if "validation_loss" in e] == [
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        30,
    ]


def test_early_stopping_keeps_the_best_weights(base_models_dir):
    # A learning rate this large makes the validation loss climb after a few steps.
    model = tune(
        n=32,
        num_epochs=30,
        learning_rate=5.0,
        val_stream=DataStream.from_iterable(records(8)),
        validation={"eval_steps": 2, "early_stopping_patience": 2},
    )
    config = model.training_config
    validations = [e for e in model.training_logs if "validation_loss" in e]
    assert config["stopped_early"] and config["steps"] < 30 * 8
    best = min(validations, key=lambda e: e["validation_loss"])
    assert config["best_step"] == best["step"] < config["steps"]
    # The kept weights are the best step's: their validation loss is the best one logged.
    from caikit_tuning.data import build_examples, collator_for
    from caikit_tuning.training import evaluate_loss, summed_token_loss
    from caikit_tuning.training.segment_attention import segment_attention

    base = model.base
    examples = build_examples(
        base.tokenizer, [dict(r.to_dict()) for r in records(8)], model.verbalizer.render, 256, 128
    )
    with segment_attention(base.model):  # packed rows, evaluated as fit() evaluates them
        loss = evaluate_loss(
            base.model,
            lambda batch: summed_token_loss(base.model, batch, model.prompt.prefix()),
            examples,
            collator_for(False, base.tokenizer.pad_token_id, None, packing=True),
            4,
            torch.device("cpu"),
            torch.autocast("cpu", dtype=torch.bfloat16)
            if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            else None,
        )
    assert loss == pytest.approx(best["validation_loss"], rel=1e-4)


def test_cosine_schedule_with_warmup_is_applied(base_models_dir):
    model = tune(num_epochs=1, n=40, optimization={"lr_scheduler": "cosine", "warmup_steps": 3})
    rates = [e["learning_rate"] for e in model.training_logs if "loss" in e]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(0.3)
    assert rates[-1] < 0.05


def test_total_batch_size_sets_the_steps(base_models_dir):
    model = tune(
        num_epochs=1,
        n=32,
        optimization={"total_train_batch_size": 16, "max_per_device_train_batch_size": 4},
    )
    assert model.training_config["steps"] == 2
    assert (
        model.training_config["micro_batch_size"] == 4
        and model.training_config["accumulation"] == 4
    )


KILLED_RUN = """
import os, signal, sys
import caikit, caikit_tuning
from caikit.core.data_model import DataStream
from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.training import checkpointing
from caikit_tuning.training.progress import progress_sink
caikit.configure(config_dict={"base_models_dir": sys.argv[1]})
rows = [{"input": "a wonderful moving film", "output": "positive"}, {"input": "a dull lifeless mess", "output": "negative"},
        {"input": "great acting and a fine story", "output": "positive"}, {"input": "boring and far too long", "output": "negative"}]
records = [TrainGenerationRecord(**rows[i % 4]) for i in range(32)]
kill_at = int(sys.argv[3])

def die(entry):
    if kill_at and entry.get("step") == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

with checkpointing(sys.argv[2]), progress_sink(die):
    model = PeftPromptTuning.train("tiny-llama", DataStream.from_iterable(records), TuningConfig(num_virtual_tokens=4),
        num_epochs=3, batch_size=4, learning_rate=0.3, verbalizer="Review: {{input}} Sentiment:", seed=3,
        checkpoint_steps=4)
model.save(sys.argv[4])
print("resumed_from", model.training_config["resumed_from_step"])
"""


def run_script(base_models_dir, folder, kill_at, out):
    return subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_RUN,
            str(base_models_dir),
            str(folder),
            str(kill_at),
            str(out),
        ],
        capture_output=True,
        text=True,
    )


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_the_same(base_models_dir, tmp_path):
    from safetensors.torch import load_file

    reference = run_script(base_models_dir, tmp_path / "ref-ckpt", 0, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run_script(base_models_dir, tmp_path / "ckpt", 14, tmp_path / "never")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file() and not (tmp_path / "never").exists()
    resumed = run_script(base_models_dir, tmp_path / "ckpt", 0, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed_from 12" in resumed.stdout
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")["prompt_embeddings"]
    actual = load_file(tmp_path / "resumed" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(expected, actual)
    import json

    reference_logs = [
        json.loads(line)
        for line in (tmp_path / "reference" / "training_logs.jsonl").read_text().splitlines()
    ]
    resumed_logs = [
        json.loads(line)
        for line in (tmp_path / "resumed" / "training_logs.jsonl").read_text().splitlines()
    ]
    assert [e["loss"] for e in resumed_logs] == [e["loss"] for e in reference_logs]


def test_a_checkpoint_of_another_run_is_not_resumed(base_models_dir, tmp_path):
    with checkpointing(tmp_path):
        tune(n=16, num_epochs=1, checkpoint_steps=2)
        other = tune(n=16, num_epochs=1, checkpoint_steps=2, learning_rate=0.1)
    assert other.training_config["resumed_from_step"] is None


def test_multi_field_records_train_and_answer_json_requests(base_models_dir):
    rows = [{"context": "the sky", "question": "what color", "output": "blue"}] * 8
    model = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(rows),
        TuningConfig(num_virtual_tokens=2),
        verbalizer="Context: {{context}} Question: {{question}} Answer:",
        num_epochs=1,
    )
    result = model.run(
        '{"context": "the sky", "question": "what color"}',
        max_new_tokens=2,
        preserve_input_text=True,
    )
    assert result.generated_text.startswith("Context: the sky Question: what color Answer:")
    with pytest.raises(ValueError, match="JSON object"):
        model.run("plain text")
    with pytest.raises(ValueError, match="record 1 has no `question`"):
        PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable([rows[0], {"context": "x", "output": "y"}]),
            TuningConfig(num_virtual_tokens=2),
            verbalizer="Context: {{context}} Question: {{question}} Answer:",
        )


def test_chat_records_train_and_serve_as_chat(base_models_dir, tmp_path):
    chats = [
        {
            "messages": [
                {"role": "user", "content": "say yes"},
                {"role": "assistant", "content": "yes"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "say no"},
                {"role": "assistant", "content": "no"},
            ]
        },
    ] * 8
    model = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(chats),
        TuningConfig(num_virtual_tokens=4),
        num_epochs=15,
        batch_size=4,
        data={"chat_loss": "assistant"},
    )
    assert model.chat
    assert model.run("say yes", max_new_tokens=3).generated_text == "yes"
    assert model.run(
        "say yes", max_new_tokens=3, preserve_input_text=True
    ).generated_text.startswith("<s>user\nsay yes")
    model.save(str(tmp_path / "chat"))
    expected = model.run("say no", max_new_tokens=3).generated_text
    assert (
        PeftPromptTuning.load(str(tmp_path / "chat")).run("say no", max_new_tokens=3).generated_text
        == expected
    )
    with pytest.raises(ValueError, match="leave `verbalizer` unset"):
        PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(chats),
            TuningConfig(num_virtual_tokens=2),
            verbalizer="Q: {{input}}",
        )
    with pytest.raises(ValueError, match="need a causal LM"):
        PeftPromptTuning.train(
            "tiny-t5", DataStream.from_iterable(chats), TuningConfig(num_virtual_tokens=2)
        )
