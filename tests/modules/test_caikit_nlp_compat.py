"""What carries over from caikit-nlp: its saved folders, and the calls its users make.

The folders in tests/fixtures/caikit_nlp/ were saved by the real caikit-nlp 0.5.15
(tests/fixtures/caikit_nlp/make_fixtures.py says how), with its outputs on them in
expected.json; their tiny base models are in tests/fixtures/caikit_nlp/base/.
"""

import json
import os
import shutil
from pathlib import Path

import caikit
import pytest
import torch
import yaml
from caikit.core.data_model import DataStream
from caikit.interfaces.nlp.data_model import ClassificationTrainRecord

from caikit_tuning import PeftPromptTuning, TextGeneration, TrainGenerationRecord, TuningConfig
from caikit_tuning.data_model import ExponentialDecayLengthPenalty
from caikit_tuning.modules.caikit_nlp import PEFT_PROMPT_TUNING_ID, TEXT_GENERATION_ID

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caikit_nlp"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROMPT = EXPECTED["prompt"]


@pytest.fixture
def caikit_nlp_bases(tmp_path):
    """base_models_dir = the fixtures' base models, for the length of one test."""
    previous = caikit.get_config().base_models_dir
    shutil.copytree(FIXTURES / "base", tmp_path / "base")
    caikit.configure(config_dict={"base_models_dir": str(tmp_path / "base")})
    yield tmp_path / "base"
    caikit.configure(config_dict={"base_models_dir": previous})


def module_id(folder: str) -> str:
    return yaml.safe_load((FIXTURES / folder / "config.yml").read_text())["module_id"]


@pytest.mark.parametrize(
    "folder", ["pt_causal_no_base", "pt_causal_with_base", "mpt_causal_no_base"]
)
def test_caikit_nlp_prompt_models_load_and_give_its_tokens(caikit_nlp_bases, folder):
    assert module_id(folder) == PEFT_PROMPT_TUNING_ID
    model = caikit.load(str(FIXTURES / folder))
    assert isinstance(model, PeftPromptTuning)
    vectors = torch.load(FIXTURES / folder / "decoder.pt", weights_only=True)
    assert torch.equal(model.prompt.weight.detach(), vectors.float())
    result = model.run(PROMPT, max_new_tokens=5)
    # caikit-nlp answers with the decoded prompt and the new tokens ("review : the movie
    # was great sentiment : : : : : :"); the same five new tokens come out here.
    reference = EXPECTED["pt_causal_with_base"]["generated_text"]
    assert result.generated_tokens == 5 and reference.endswith(result.generated_text)
    assert result.generated_text.strip(" :") == ""


def test_a_caikit_nlp_seq2seq_prompt_model_loads_and_runs(caikit_nlp_bases):
    # caikit-nlp itself cannot reload this folder ("Only export of causal LM models").
    model = caikit.load(str(FIXTURES / "pt_seq2seq_no_base"))
    assert model.base.is_encoder_decoder and model.prompt.prefix().encoder is not None
    result = model.run(PROMPT, max_new_tokens=5)
    assert result.generated_tokens == 5
    assert result.generated_text == EXPECTED["pt_seq2seq_in_memory"]


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("tg_bootstrap_causal", "tg_bootstrap_causal"),
        ("tg_trained_causal", "tg_trained_causal"),
        ("tg_bootstrap_seq2seq", "tg_bootstrap_seq2seq"),
    ],
)
def test_caikit_nlp_text_generation_models_answer_as_caikit_nlp_did(folder, expected):
    assert module_id(folder) == TEXT_GENERATION_ID
    model = caikit.load(str(FIXTURES / folder))
    assert isinstance(model, TextGeneration)
    result = model.run(PROMPT, max_new_tokens=5, preserve_input_text=True)
    want = EXPECTED[expected]["generated_text"]
    if model.base.is_encoder_decoder:
        # caikit-nlp does not put the input in front of seq2seq output.
        assert result.generated_text.removeprefix(PROMPT) == want
    else:
        assert result.generated_text == want


def test_a_loaded_caikit_nlp_model_saves_in_this_layout(caikit_nlp_bases, tmp_path):
    model = caikit.load(str(FIXTURES / "tg_bootstrap_causal"))
    model.save(str(tmp_path / "again"))
    again = caikit.load(str(tmp_path / "again"))
    assert (
        again.run(PROMPT, max_new_tokens=5).generated_text
        == model.run(PROMPT, max_new_tokens=5).generated_text
    )
    prompt = caikit.load(str(FIXTURES / "pt_causal_no_base"))
    prompt.save(str(tmp_path / "prompt"))
    assert (tmp_path / "prompt" / "adapter_model.safetensors").is_file()
    assert "caikit-nlp" in caikit.load(str(tmp_path / "prompt")).training_config["saved_by"]


def test_a_missing_base_model_is_named(tmp_path):
    shutil.copytree(FIXTURES / "pt_causal_no_base", tmp_path / "prompt")
    previous = caikit.get_config().base_models_dir
    caikit.configure(config_dict={"base_models_dir": str(tmp_path / "no-models")})
    try:
        with pytest.raises(ValueError, match="trained on 'tiny-llama'.*base_models_dir"):
            caikit.load(str(tmp_path / "prompt"))
    finally:
        caikit.configure(config_dict={"base_models_dir": previous})


def test_prompt_files_are_read_as_tensors_only(caikit_nlp_bases, tmp_path):
    folder = tmp_path / "prompt"
    shutil.copytree(FIXTURES / "pt_causal_no_base", folder)

    class Sneaky:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save(Sneaky(), folder / "decoder.pt")
    with pytest.raises(ValueError, match="decoder.pt is not a tensor file"):
        caikit.load(str(folder))
    assert not (tmp_path / "pwned").exists()
    torch.save({"prompt": torch.zeros(4, 16)}, folder / "decoder.pt")
    with pytest.raises(ValueError, match="must hold one"):
        caikit.load(str(folder))
    config = yaml.safe_load((folder / "config.yml").read_text())
    config["DECODER"] = "../../etc/passwd"
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="not a file inside the model folder"):
        caikit.load(str(folder))


# ------------------------------------------------- calls caikit-nlp accepted


RECORDS = [
    TrainGenerationRecord(input="a wonderful film", output="positive"),
    TrainGenerationRecord(input="a dull mess", output="negative"),
] * 4


def train(tuning_config, stream=None, **options):
    return PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(stream or RECORDS),
        tuning_config,
        num_epochs=options.pop("num_epochs", 1),
        batch_size=4,
        **options,
    )


def test_init_text_without_a_method_is_random_init_and_said_so(base_models_dir):
    model = train(TuningConfig(num_virtual_tokens=4, prompt_tuning_init_text="Classify the review"))
    assert model.settings.init_method.name == "RANDOM"
    assert any("prompt_tuning_init_text is not used" in n for n in model.training_config["notes"])


def test_classification_records_train_as_text_and_joined_labels(base_models_dir):
    rows = [ClassificationTrainRecord(text="a wonderful film", labels=["positive", "good"])] * 4
    model = train(TuningConfig(num_virtual_tokens=2), rows)
    assert model.training_config["num_records"] == 4


def test_training_data_limit_by_module_and_base_model(base_models_dir):
    try:
        caikit.configure(
            config_dict={"training_data_limit": {PEFT_PROMPT_TUNING_ID: {"tiny-llama": 7}}}
        )
        with pytest.raises(ValueError, match="training_data_limit allows at most 7"):
            train(TuningConfig(num_virtual_tokens=2))
        assert (
            train(TuningConfig(num_virtual_tokens=2), RECORDS[:7]).training_config["num_records"]
            == 7
        )
    finally:
        caikit.configure(
            config_dict={"training_data_limit": {PEFT_PROMPT_TUNING_ID: {"tiny-llama": -1}}}
        )


def test_save_base_model_makes_a_folder_that_loads_on_its_own(base_models_dir, tmp_path):
    model = train(TuningConfig(num_virtual_tokens=2))
    model.save(str(tmp_path / "bundled"), save_base_model=True)
    assert (tmp_path / "bundled" / "base_model" / "model.safetensors").is_file()
    previous = caikit.get_config().base_models_dir
    caikit.configure(config_dict={"base_models_dir": str(tmp_path / "elsewhere")})
    try:
        loaded = caikit.load(str(tmp_path / "bundled"))
    finally:
        caikit.configure(config_dict={"base_models_dir": previous})
    assert (
        loaded.run("a wonderful film", max_new_tokens=4).generated_text
        == model.run("a wonderful film", max_new_tokens=4).generated_text
    )


def test_generation_parameters_as_caikit_nlp_clients_send_them(base_models_dir):
    model = train(TuningConfig(num_virtual_tokens=2))
    plain = model.run("a fine film", max_new_tokens=6, min_new_tokens=6).generated_text
    greedy_with_knobs = model.run(
        "a fine film",
        max_new_tokens=6,
        min_new_tokens=6,
        decoding_method="GREEDY",
        top_k=3,
        top_p=0.5,
        typical_p=0.5,
        temperature=0.01,
    )
    assert greedy_with_knobs.generated_text == plain
    zero = model.run("a fine film", max_new_tokens=6, min_new_tokens=6, repetition_penalty=0.0)
    assert zero.generated_text == plain
    decaying = model.run(
        "a fine film",
        max_new_tokens=6,
        exponential_decay_length_penalty=ExponentialDecayLengthPenalty(
            start_index=1, decay_factor=0.2
        ),
    )
    assert decaying.generated_tokens >= 1


def test_zero_epochs_keep_the_initial_prompt(base_models_dir):
    model = train(TuningConfig(num_virtual_tokens=3), num_epochs=0)
    again = train(TuningConfig(num_virtual_tokens=3), num_epochs=0)
    assert model.training_config["steps"] == 0
    assert torch.equal(model.prompt.weight, again.prompt.weight)  # seeded initial prompt
    assert any("num_epochs 0" in note for note in model.training_config["notes"])


def test_float16_on_cpu_falls_back_to_float32(base_models_dir, tmp_path):
    model = train(TuningConfig(num_virtual_tokens=2), torch_dtype="float16", device="cpu")
    assert next(model.base.model.parameters()).dtype == torch.float32
    assert any("float16" in note for note in model.training_config["notes"])
    model.save(str(tmp_path / "m"))
    loaded = caikit.load(str(tmp_path / "m"), torch_dtype="float16")
    assert next(loaded.base.model.parameters()).dtype == torch.float32
