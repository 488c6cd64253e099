"""LoraTuning on tiny real models: LoRA, AdaLoRA and IA3 train, save, reload and merge."""

import functools
import json
import shutil
import subprocess
import sys

import caikit
import pytest
import torch
from caikit.core.data_model import DataStream
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from caikit_tuning import TrainGenerationRecord
from caikit_tuning.base_models import locate_base_model
from caikit_tuning.data_model.adapters import AdapterConfig, QuantizationConfig
from caikit_tuning.inputs import NO_PREFIX
from caikit_tuning.modules.lora import (
    AdapterSettings,
    LoraTuning,
    QuantizationSettings,
    bitsandbytes_kwargs,
    step_hooks,
)
from caikit_tuning.modules.lora import lora_tuning as lora_module
from caikit_tuning.modules.lora.step_hooks import StepHooks
from caikit_tuning.modules.lora.targets import model_skeleton, resolve_targets

TEXT = "a wonderful moving film"
VERBALIZER = "Review: {{input}} Sentiment:"
# Learning rates that move each adapter visibly in 16 steps on the tiny models.
LEARNING_RATES = {"LORA": 3e-2, "ADALORA": 1e-1, "IA3": 3e-1}


def records(n=16):
    rows = [
        {"input": TEXT, "output": "positive"},
        {"input": "a dull lifeless mess", "output": "negative"},
    ]
    return [TrainGenerationRecord(**rows[i % 2]) for i in range(n)]


def tune(base="tiny-llama", adapter_type="LORA", **options):
    settings = {
        "num_epochs": 4,
        "batch_size": 4,
        "learning_rate": LEARNING_RATES[adapter_type],
        "verbalizer": VERBALIZER,
        "adapter_config": {"adapter_type": adapter_type},
    }
    settings.update(options)
    return LoraTuning.train(base, DataStream.from_iterable(records()), **settings)


def greedy(model, n=6):
    return model.run(TEXT, max_new_tokens=n, min_new_tokens=n).generated_text


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    """Next-token logits of `text` (seq2seq: of the first decoder position)."""
    ids = tokenizer(text, return_tensors="pt")
    if model.config.is_encoder_decoder:
        start = torch.tensor([[model.config.decoder_start_token_id]])
        return model(**ids, decoder_input_ids=start).logits[0, -1]
    return model(**ids).logits[0, -1]


def module_logits(model: LoraTuning) -> torch.Tensor:
    with model.adapted() as adapted:
        return logits(adapted, model.base.tokenizer, model.model_input(TEXT))


@pytest.fixture(scope="module")
def trained(base_models_dir):
    """trained(base, adapter_type): one trained model per pair, built on first use."""
    return functools.cache(tune)


@pytest.mark.parametrize("adapter_type", ["LORA", "ADALORA", "IA3"])
def test_each_adapter_type_lowers_the_loss(adapter_type, trained):
    model = trained("tiny-llama", adapter_type)
    losses = [e["loss"] for e in model.training_logs if "loss" in e]
    assert len(losses) == model.training_config["steps"] == 16
    assert losses[-1] < 0.8 * losses[0]
    assert model.settings.adapter_type.name == adapter_type and not model.merged
    # Only the adapter was trained: the base model's own weights are unchanged.
    fresh = AutoModelForCausalLM.from_pretrained(locate_base_model("tiny-llama").location)
    assert torch.equal(model.base.model.lm_head.weight, fresh.lm_head.weight) and torch.equal(
        model.base.model.model.embed_tokens.weight, fresh.model.embed_tokens.weight
    )


def test_adalora_allocates_ranks_down_to_target_r(trained):
    model = trained("tiny-llama", "ADALORA")
    config = model.adapter.peft_config["default"]
    # total_step defaults to the run's optimizer steps; the final allocation happened.
    assert config.total_step == model.settings.total_step == 16
    assert config.rank_pattern, "update_and_allocate never ran"
    kept = sum(int(torch.as_tensor(mask).sum()) for mask in config.rank_pattern.values())
    # The budget shrinks from init_r (12) to target_r (8) per adapted matrix on average.
    assert kept == 8 * len(config.rank_pattern)


def orthogonality(model: LoraTuning) -> float:
    """Mean ||A A^T - I|| over AdaLoRA's lora_A and ||B^T B - I|| over its lora_B."""
    norms = []
    for name, p in model.adapter.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            gram = p @ p.T if "lora_A" in name else p.T @ p
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0])))
    return torch.stack(norms).mean().item()


def test_adalora_orthogonality_penalty_is_applied(base_models_dir):
    def trained_with(weight):
        config = {"adapter_type": "ADALORA", "orth_reg_weight": weight}
        return tune(adapter_type="ADALORA", adapter_config=config, num_epochs=2)

    assert orthogonality(trained_with(5.0)) < 0.9 * orthogonality(trained_with(0.0))


def test_fit_adapter_hands_the_hooks_to_fit(monkeypatch):
    seen = {}

    def fit(base, plan, params, prefix, records, val_records, after_step, penalty, **options):
        seen.update(after_step=after_step, penalty=penalty, prefix=prefix(None), **options)
        return "result"

    monkeypatch.setattr(step_hooks, "fit", fit)
    hooks = StepHooks(after_step=print, penalty=torch.zeros)
    assert step_hooks.fit_adapter(None, None, [], [], [], hooks, False) == "result"
    assert seen == {
        "after_step": print,
        "penalty": torch.zeros,
        "prefix": NO_PREFIX,
        "cast_frozen_weights": False,
    }


def test_seq2seq_model_trains_and_generates(trained):
    model = trained("tiny-t5", "LORA")
    losses = [e["loss"] for e in model.training_logs if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    assert greedy(model, 3).startswith("posit")


RELOAD = """
import json, sys, caikit, caikit_tuning
import caikit_tuning.modules.lora  # registers LoraTuning with caikit
caikit.configure(config_dict={"base_models_dir": sys.argv[2]})
model = caikit.load(sys.argv[1])
print(json.dumps(model.run("a wonderful moving film", max_new_tokens=6, min_new_tokens=6).generated_text))
"""


def test_adapter_saves_and_reloads_identically_in_a_fresh_process(
    trained, base_models_dir, tmp_path
):
    model = trained("tiny-llama", "LORA")
    model.save(str(tmp_path / "tuned"))
    files = sorted(p.name for p in (tmp_path / "tuned").iterdir())
    assert files == ["adapter", "config.yml", "training_curve.png", "training_logs.jsonl"]
    adapter = {p.name for p in (tmp_path / "tuned" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter
    config = json.loads((tmp_path / "tuned" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "tuned"), str(base_models_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == greedy(model)


@pytest.mark.parametrize(
    "base, adapter_type", [("tiny-llama", "ADALORA"), ("tiny-llama", "IA3"), ("tiny-t5", "IA3")]
)
def test_every_adapter_type_round_trips(base, adapter_type, trained, tmp_path):
    model = trained(base, adapter_type)
    model.save(str(tmp_path / "tuned"))
    loaded = caikit.load(str(tmp_path / "tuned"))
    assert isinstance(loaded, LoraTuning) and loaded.settings == model.settings
    assert greedy(loaded) == greedy(model)
    assert torch.allclose(module_logits(loaded), module_logits(model), atol=1e-5)
    assert loaded.training_logs == model.training_logs


def test_saved_adapter_loads_with_plain_peft(trained, tiny_t5, tmp_path):
    model = trained("tiny-t5", "LORA")
    model.save(str(tmp_path / "tuned"))
    plain = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), str(tmp_path / "tuned" / "adapter")
    ).eval()
    ours = module_logits(model)
    assert torch.allclose(logits(plain, model.base.tokenizer, model.model_input(TEXT)), ours)


def test_merged_and_unmerged_models_agree(trained, tmp_path):
    unmerged = trained("tiny-llama", "LORA")
    merged = tune("tiny-llama", "LORA", merge_adapter_into_base_model=True)
    assert merged.merged and greedy(merged) == greedy(unmerged)
    assert torch.allclose(module_logits(merged), module_logits(unmerged), atol=1e-4)
    merged.save(str(tmp_path / "merged"))
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == ["config.yml", "model", "training_curve.png", "training_logs.jsonl"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model").eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    plain_logits = logits(plain, merged.base.tokenizer, merged.model_input(TEXT))
    assert torch.allclose(plain_logits, module_logits(unmerged), atol=1e-4)
    reloaded = LoraTuning.load(str(tmp_path / "merged"))
    assert reloaded.merged and reloaded.base.source.name == "tiny-llama"
    assert greedy(reloaded) == greedy(unmerged)


def test_pretrained_adapter_weights_continue_from_the_saved_adapter(
    trained, base_models_dir, monkeypatch
):
    saved = base_models_dir / "lora-tests" / "first"
    trained("tiny-llama", "LORA").save(str(saved))
    try:
        starts = []
        real_fit = lora_module.fit_adapter

        def spy(base, *args, **kwargs):
            starts.append(
                {n: p.detach().clone() for n, p in base.model.named_parameters() if p.requires_grad}
            )
            return real_fit(base, *args, **kwargs)

        monkeypatch.setattr(lora_module, "fit_adapter", spy)
        # By name under base_models_dir (a saved LoraTuning folder: its adapter is used).
        continued = tune(adapter_config=None, pretrained_adapter_weights="lora-tests/first")
        weights = load_file(str(saved / "adapter" / "adapter_model.safetensors"))
        start = {"base_model.model." + n.replace(".default", ""): t for n, t in starts[0].items()}
        assert start.keys() == weights.keys()
        assert all(torch.equal(start[k], weights[k]) for k in weights)
        assert continued.training_config["pretrained_adapter_weights"] == str(saved / "adapter")
        assert continued.settings.target_modules == ("q_proj", "v_proj")
        # In-process, the adapter folder itself may be given as a path.
        tune(adapter_config=None, pretrained_adapter_weights=str(saved / "adapter"))
        assert len(starts) == 2
    finally:
        shutil.rmtree(base_models_dir / "lora-tests")


def test_pretrained_adapter_weights_follow_the_path_policy(base_models_dir, tmp_path):
    def check(value, match):
        with pytest.raises(ValueError, match=match):
            LoraTuning.validate_training(request(pretrained_adapter_weights=value))

    check("../outside", "must not contain '..'")
    check("/etc", "/etc has no adapter_config.json")
    check("missing-adapter", "is not an adapter")
    (tmp_path / "unsafe").mkdir()
    (tmp_path / "unsafe" / "adapter_config.json").write_text("{}")
    check(str(tmp_path / "unsafe"), "only safetensors adapters are loaded")
    caikit.configure(config_dict={"restrict_base_models_to_dir": True})
    try:
        check(str(tmp_path / "unsafe"), "absolute paths are not allowed")
    finally:
        caikit.configure(config_dict={"restrict_base_models_to_dir": False})
    with pytest.raises(ValueError, match="give `adapter_config` or `pretrained_adapter_weights`"):
        LoraTuning.validate_training(
            request(adapter_config={"r": 4}, pretrained_adapter_weights="x")
        )


def request(**options):
    values = {"base_model": "tiny-llama", "train_stream": DataStream.from_iterable(records(2))}
    values.update(options)
    return values


ADALORA = {"adapter_type": "ADALORA"}
IA3 = {"adapter_type": "IA3"}


@pytest.mark.parametrize(
    "adapter_config, match",
    [
        ({"target_r": 4}, r"`adapter_config.target_r` only applies to ADALORA; LORA takes \['r',"),
        ({**IA3, "r": 4}, r"`adapter_config.r` only applies to LORA; IA3 takes \['target_modules'"),
        ({**ADALORA, "use_dora": True}, r"`adapter_config.use_dora` only applies to LORA;"),
        ({"adapter_type": "DORA"}, r"`adapter_config.adapter_type` must be one of \['LORA'"),
        ({"r": 0}, r"`adapter_config.r` must be >= 1, got 0."),
        ({"dropout": 1.5}, r"`adapter_config.dropout` must be in \[0, 1\), got 1.5."),
        ({"bias": "some"}, r"`adapter_config.bias` must be one of \['none', 'all', 'lora_only'\]"),
        ({"rank": 4}, r"unknown field\(s\) \['rank'\]; valid fields are \['adapter_type', 'r'"),
        ({"target_modules": ["qq_proj"]}, r"'qq_proj' names no module .* are \['down_proj'"),
        ({**ADALORA, "init_r": 4, "target_r": 6}, r"`adapter_config.target_r` \(6\) must be <="),
        ({**ADALORA, "tinit": 4, "tfinal": 4, "total_step": 8}, r"must be < total_step \(8\)"),
        (
            {**IA3, "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
            r"feedforward_modules` \['down_proj'\] must also be in target_modules",
        ),
    ],
)
def test_invalid_adapter_settings_are_refused_at_submission(adapter_config, match, base_models_dir):
    with pytest.raises(ValueError, match=match):
        LoraTuning.validate_training(request(adapter_config=adapter_config))


def test_valid_requests_pass_submission(base_models_dir):
    LoraTuning.validate_training(request())
    LoraTuning.validate_training(
        request(adapter_config=AdapterConfig(adapter_type="ADALORA", init_r=6, target_r=2))
    )
    with pytest.raises(TypeError, match="`merge_adapter_into_base_model` must be true or false"):
        LoraTuning.validate_training(request(merge_adapter_into_base_model="yes"))


def test_wire_zero_values_mean_unset():
    # A message from gRPC holds 0 / "" / [] for every field the client left unset.
    wire = AdapterConfig.from_proto(AdapterConfig(adapter_type="LORA", r=4).to_proto())
    assert wire.target_r == 0 and wire.target_modules == []
    settings = AdapterSettings.from_request(wire)
    assert (settings.r, settings.alpha, settings.target_r) == (4, 8, None)


@pytest.mark.parametrize(
    "base, adapter_type, targets, feedforward",
    [
        ("tiny-llama", "LORA", ("q_proj", "v_proj"), None),
        ("tiny-llama", "IA3", ("k_proj", "v_proj", "down_proj"), ("down_proj",)),
        ("tiny-t5", "ADALORA", ("q", "v"), None),
        ("tiny-t5", "IA3", ("k", "v", "wo"), ("wo",)),
    ],
)
def test_target_modules_are_found_from_the_model(
    base, adapter_type, targets, feedforward, base_models_dir
):
    skeleton = model_skeleton(locate_base_model(base))
    settings = resolve_targets(
        AdapterSettings.from_request({"adapter_type": adapter_type}), skeleton
    )
    assert settings.target_modules == targets and settings.feedforward_modules == feedforward


def test_bitsandbytes_kwargs_are_built_from_the_settings():
    assert bitsandbytes_kwargs(QuantizationSettings()) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    fp4 = QuantizationSettings.from_request(
        {"quant_type": "fp4", "double_quant": True, "compute_dtype": "float16"}
    )
    assert bitsandbytes_kwargs(fp4) == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float16,
    }
    eight = QuantizationSettings.from_request(QuantizationConfig(bits=8))
    assert bitsandbytes_kwargs(eight) == {"load_in_8bit": True}
    # An all-unset message from the wire is the 4-bit default.
    wire = QuantizationConfig.from_proto(QuantizationConfig().to_proto())
    assert QuantizationSettings.from_request(wire) == QuantizationSettings()


@pytest.mark.parametrize(
    "config, match",
    [
        ({"bits": 3}, r"`quantization.bits` must be 4 or 8, got 3."),
        ({"bits": 8, "quant_type": "NF4"}, r"`quantization.quant_type` only applies to 4-bit"),
        ({"compute_dtype": "int8"}, r"`quantization.compute_dtype` must be one of \['bfloat16'"),
        ({"quant_type": "int4"}, r"`quantization.quant_type` must be one of \['NF4', 'FP4'\]"),
        ({"group_size": 64}, r"`quantization` has unknown field\(s\) \['group_size'\]"),
    ],
)
def test_invalid_quantization_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        QuantizationSettings.from_request(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on CPU-only machines")
def test_quantization_without_cuda_says_it_needs_a_gpu(base_models_dir):
    with pytest.raises(ValueError, match="`quantization` needs a CUDA GPU"):
        LoraTuning.validate_training(request(quantization={"bits": 4}))
    with pytest.raises(ValueError, match="cannot merge into a quantized base model"):
        LoraTuning.validate_training(
            request(quantization={"bits": 4}, merge_adapter_into_base_model=True)
        )
