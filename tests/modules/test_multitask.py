"""Multitask prompt tuning: making a source prompt from several tasks, starting from it."""

import caikit
import pytest
import torch
from caikit.core.data_model import DataStream
from safetensors.torch import load_file

from caikit_tuning import PeftPromptTuning, TuningConfig

SENTIMENT = [
    {"input": "a wonderful moving film", "output": "positive", "task": "sentiment"},
    {"input": "a dull lifeless mess", "output": "negative", "task": "sentiment"},
]
TOPIC = [
    {"input": "the striker scored twice", "output": "sports", "task": "topic"},
    {"input": "the senate passed the bill", "output": "politics", "task": "topic"},
]


def tune(rows, tuning_config, base="tiny-llama", **options):
    settings = {
        "num_epochs": 3,
        "batch_size": 4,
        "learning_rate": 0.3,
        "verbalizer": "{{input}} =>",
        "seed": 1,
    }
    settings.update(options)
    return PeftPromptTuning.train(
        base,
        DataStream.from_iterable(rows),
        tuning_config,
        tuning_type="MULTITASK_PROMPT_TUNING",
        **settings,
    )


@pytest.fixture
def source_base(tmp_path, base_models_dir, monkeypatch):
    monkeypatch.setenv("SOURCE_PROMPT_BASE", str(tmp_path / "sources"))
    return tmp_path / "sources"


@pytest.fixture
def two_task_source(source_base):
    model = tune((SENTIMENT + TOPIC) * 4, TuningConfig(num_virtual_tokens=4, num_ranks=2))
    model.save(str(source_base / "two-tasks"))
    return model


@pytest.fixture(scope="session")
def narrow_llama(base_models_dir, train_rows):
    from caikit_tuning.testing.tiny_models import build_tiny_llama

    return build_tiny_llama(
        base_models_dir / "tiny-llama-32", [r["input"] for r in train_rows[:300]], hidden=32
    )


def test_two_tasks_make_a_source_prompt(two_task_source, source_base):
    tensors = load_file(source_base / "two-tasks" / "source_prompt.safetensors")
    assert tensors["prompt_embeddings"].shape == (4, 48)
    assert tensors["prefix_task_cols"].shape == (2, 4, 2)
    assert tensors["prefix_task_rows"].shape == (2, 2, 48)
    assert two_task_source.tasks == ["sentiment", "topic"]
    # The served prompt is task 0's product, as a plain PEFT prompt.
    served = load_file(source_base / "two-tasks" / "adapter_model.safetensors")["prompt_embeddings"]
    expected = tensors["prompt_embeddings"] * (
        tensors["prefix_task_cols"][0] @ tensors["prefix_task_rows"][0]
    )
    assert torch.allclose(served, expected, atol=1e-6)
    losses = [e["loss"] for e in two_task_source.training_logs if "loss" in e]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["ONLY_SOURCE_SHARED", "AVERAGE_SOURCE", "AVERAGE_SOURCE_TASKS"])
def test_new_tuning_starts_from_the_source(two_task_source, method):
    source = two_task_source.source
    model = tune(
        SENTIMENT * 2,
        TuningConfig(
            num_virtual_tokens=4,
            num_ranks=2,
            prompt_tuning_init_method=method,
            prompt_tuning_init_source_model="two-tasks",
        ),
        learning_rate=1e-9,
        num_epochs=1,
    )
    assert torch.allclose(model.source.shared, source.shared, atol=1e-5)
    if method != "ONLY_SOURCE_SHARED":
        assert torch.allclose(model.source.task_cols[0], source.task_cols.mean(0), atol=1e-5)
        assert torch.allclose(model.source.task_rows[0], source.task_rows.mean(0), atol=1e-5)


@pytest.mark.parametrize("method", ["RANDOM", "TEXT"])
def test_random_and_text_init_train_save_load_and_stream(method, base_models_dir, tmp_path):
    config = TuningConfig(num_virtual_tokens=3, prompt_tuning_init_method=method)
    if method == "TEXT":
        config = TuningConfig(
            num_virtual_tokens=3,
            prompt_tuning_init_method="TEXT",
            prompt_tuning_init_text="sentiment",
        )
    model = tune(SENTIMENT * 4, config, num_epochs=4)
    expected = model.run("a fine film", max_new_tokens=4, min_new_tokens=4).generated_text
    chunks = list(model.run_stream_out("a fine film", max_new_tokens=4, min_new_tokens=4))
    assert "".join(c.generated_text for c in chunks) == expected
    model.save(str(tmp_path / "m"))
    loaded = caikit.load(str(tmp_path / "m"))
    assert loaded.run("a fine film", max_new_tokens=4, min_new_tokens=4).generated_text == expected
    assert loaded.source is not None and loaded.tasks == ["sentiment"]


@pytest.mark.parametrize("types", [["ENCODER"], ["DECODER"], ["ENCODER", "DECODER"]])
def test_seq2seq_multitask_placements(types, base_models_dir, tmp_path):
    model = tune(
        (SENTIMENT + TOPIC) * 2,
        TuningConfig(num_virtual_tokens=2, output_model_types=types),
        base="tiny-t5",
    )
    assert model.source.shared.shape[0] == 2 * len(types)
    expected = model.run("a fine film", max_new_tokens=3, min_new_tokens=3).generated_text
    model.save(str(tmp_path / "m"))
    assert (
        PeftPromptTuning.load(str(tmp_path / "m"))
        .run("a fine film", max_new_tokens=3, min_new_tokens=3)
        .generated_text
        == expected
    )


def test_tgis_export_writes_prompt_vectors(base_models_dir, tmp_path):
    model = tune(SENTIMENT * 2, TuningConfig(num_virtual_tokens=2), num_epochs=1)
    caikit.configure(config_dict={"export_tgis_prompts": True})
    try:
        model.save(str(tmp_path / "m"))
    finally:
        caikit.configure(config_dict={"export_tgis_prompts": False})
    vectors = torch.load(tmp_path / "m" / "decoder.pt", weights_only=True)
    assert torch.equal(vectors, model.prompt.weight.detach())


@pytest.mark.parametrize(
    ("rows", "tuning_type", "config", "message"),
    [
        (
            SENTIMENT,
            "PROMPT_TUNING",
            {
                "num_virtual_tokens": 4,
                "prompt_tuning_init_method": "ONLY_SOURCE_SHARED",
                "prompt_tuning_init_source_model": "two-tasks",
            },
            "needs tuning_type MULTITASK_PROMPT_TUNING",
        ),
        (
            SENTIMENT,
            "MULTITASK_PROMPT_TUNING",
            {"num_virtual_tokens": 4, "prompt_tuning_init_method": "AVERAGE_SOURCE"},
            "`tuning_config.prompt_tuning_init_source_model` is required",
        ),
        (
            SENTIMENT,
            "MULTITASK_PROMPT_TUNING",
            {
                "num_virtual_tokens": 4,
                "num_ranks": 2,
                "prompt_tuning_init_method": "AVERAGE_SOURCE",
                "prompt_tuning_init_source_model": "missing",
            },
            "has no source_prompt.safetensors",
        ),
        (
            SENTIMENT,
            "MULTITASK_PROMPT_TUNING",
            {
                "num_virtual_tokens": 4,
                "num_ranks": 2,
                "prompt_tuning_init_method": "AVERAGE_SOURCE",
                "prompt_tuning_init_source_model": "../two-tasks",
            },
            "must not contain '..'",
        ),
        (
            SENTIMENT,
            "MULTITASK_PROMPT_TUNING",
            {
                "num_virtual_tokens": 6,
                "num_ranks": 2,
                "prompt_tuning_init_method": "AVERAGE_SOURCE",
                "prompt_tuning_init_source_model": "two-tasks",
            },
            "the source prompt has 4 prompt rows but this tuning needs 6",
        ),
        (
            SENTIMENT,
            "MULTITASK_PROMPT_TUNING",
            {
                "num_virtual_tokens": 4,
                "num_ranks": 1,
                "prompt_tuning_init_method": "AVERAGE_SOURCE",
                "prompt_tuning_init_source_model": "two-tasks",
            },
            "the source prompt has 2 ranks but `tuning_config.num_ranks` is 1",
        ),
        (SENTIMENT + TOPIC, "PROMPT_TUNING", {"num_virtual_tokens": 4}, "the records name 2 tasks"),
        (
            SENTIMENT,
            "PROMPT_TUNING",
            {"num_virtual_tokens": 4, "num_ranks": 2},
            "`tuning_config.num_ranks` only applies",
        ),
    ],
)
def test_errors_name_both_values(two_task_source, rows, tuning_type, config, message):
    with pytest.raises(ValueError, match=message):
        PeftPromptTuning.train(
            "tiny-llama", DataStream.from_iterable(rows), config, tuning_type=tuning_type
        )


def test_a_source_from_another_model_is_refused(two_task_source, narrow_llama):
    with pytest.raises(ValueError, match="hidden size 48, but the base model's is 32"):
        PeftPromptTuning.validate_training(
            {
                "base_model": "tiny-llama-32",
                "train_stream": SENTIMENT,
                "tuning_config": {
                    "num_virtual_tokens": 4,
                    "num_ranks": 2,
                    "prompt_tuning_init_method": "AVERAGE_SOURCE",
                    "prompt_tuning_init_source_model": "two-tasks",
                },
                "tuning_type": "MULTITASK_PROMPT_TUNING",
            }
        )
