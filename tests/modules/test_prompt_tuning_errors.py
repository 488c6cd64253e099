"""Every bad train() argument is refused before any training, naming the field."""

import pytest
from caikit.core.data_model import DataStream

from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig

GOOD = [TrainGenerationRecord(input="a fine film", output="positive")] * 4


def train(**overrides):
    options = {
        "base_model": "tiny-llama",
        "train_stream": DataStream.from_iterable(GOOD),
        "tuning_config": TuningConfig(num_virtual_tokens=2),
        "num_epochs": 1,
    }
    options.update(overrides)
    return PeftPromptTuning.train(**options)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_model": "no-such-model"}, r"`base_model` 'no-such-model' was not found"),
        ({"base_model": "../outside"}, r"`base_model` must not contain '\.\.'"),
        ({"base_model": ""}, "`base_model` must name"),
        ({"train_stream": None}, "`train_stream` is required"),
        ({"train_stream": DataStream.from_iterable([])}, "`train_stream` is empty"),
        (
            {"train_stream": DataStream.from_iterable([{"input": "x"}])},
            "record 0 has no string `output`",
        ),
        ({"tuning_config": None}, "`tuning_config` is required"),
        (
            {"tuning_config": TuningConfig(num_virtual_tokens=0)},
            "`tuning_config.num_virtual_tokens` must be",
        ),
        (
            {"tuning_config": {"num_virtual_tokens": 2, "bogus": 1}},
            r"unknown field\(s\) \['bogus'\]",
        ),
        (
            {"tuning_config": TuningConfig(num_virtual_tokens=2, prompt_tuning_init_method="TEXT")},
            "`tuning_config.prompt_tuning_init_text` is required",
        ),
        (
            {"tuning_config": TuningConfig(num_virtual_tokens=2, prompt_tuning_init_method="NOPE")},
            "`tuning_config.prompt_tuning_init_method` must be one of",
        ),
        (
            {
                "tuning_config": TuningConfig(
                    num_virtual_tokens=2, prompt_tuning_init_method="AVERAGE_SOURCE_TASKS"
                )
            },
            "needs tuning_type MULTITASK_PROMPT_TUNING",
        ),
        (
            {"tuning_config": TuningConfig(num_virtual_tokens=2, output_model_types=["ENCODER"])},
            "ENCODER needs an encoder-decoder model",
        ),
        (
            {"tuning_config": TuningConfig(num_virtual_tokens=2, output_model_types=["MIDDLE"])},
            "`tuning_config.output_model_types` must be one of",
        ),
        ({"tuning_type": "LORA"}, r"`tuning_type` must be one of \['PROMPT_TUNING'"),
        ({"verbalizer": "no field"}, "`verbalizer` .* names no field"),
        ({"verbalizer": "{{label}}"}, "record 0 has no `label`, which the verbalizer names"),
        ({"num_epochs": -1}, "`num_epochs` must be >= 0"),
        ({"batch_size": -2}, "`batch_size` must be >= 1"),
        ({"accumulate_steps": 0}, "`accumulate_steps` must be >= 1"),
        ({"learning_rate": 0.0}, "`learning_rate` must be > 0"),
        ({"max_source_length": 0}, "`max_source_length` must be >= 1"),
        ({"num_epochs": 1.5}, "`num_epochs` must be an integer"),
        ({"torch_dtype": "int8"}, "`torch_dtype` must be one of"),
        ({"device": "cuda"}, "no CUDA device is available"),
        ({"device": "tpu9"}, "`device`"),
    ],
)
def test_bad_arguments_are_refused(base_models_dir, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train(**overrides)


def test_a_folder_that_is_not_a_model(base_models_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not found|config.json"):
        train(base_model=str(tmp_path / "empty"))


def test_a_non_generative_model_is_refused(base_models_dir, tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=8).save_pretrained(
        tmp_path / "enc"
    )
    with pytest.raises(
        ValueError, match="'distilbert' model, which is neither a causal language model"
    ):
        train(base_model=str(tmp_path / "enc"))


def test_only_safetensors_weights_are_loaded(base_models_dir, tiny_llama, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no safetensors weights"):
        train(base_model=str(folder))


def test_restricted_mode_refuses_paths(base_models_dir, tiny_llama):
    import caikit

    caikit.configure(config_dict={"restrict_base_models_to_dir": True})
    try:
        with pytest.raises(ValueError, match="absolute paths are not allowed"):
            train(base_model=str(tiny_llama))
        assert train(base_model="tiny-llama") is not None
    finally:
        caikit.configure(config_dict={"restrict_base_models_to_dir": False})


def test_downloads_need_permission(base_models_dir, monkeypatch):
    monkeypatch.setenv("ALLOW_DOWNLOADS", "false")
    with pytest.raises(ValueError, match="ALLOW_DOWNLOADS=true"):
        train(base_model="some-org/some-model")
