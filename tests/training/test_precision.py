"""Frozen weights cast once give the same bf16-autocast results as casting every step."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.data import Example, collate_packed
from caikit_tuning.inputs import PromptPrefix
from caikit_tuning.training import summed_token_loss
from caikit_tuning.training.devices import bf16_supported
from caikit_tuning.training.precision import FrozenWeightCast

EXAMPLES = [Example([3, 10, 11, 12, 13], [20, 1]), Example([3, 14], [21, 22, 1])]


def _loss_and_grad(model, prompt):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = summed_token_loss(model, collate_packed(EXAMPLES), PromptPrefix(decoder=prompt))
    loss.backward()
    grad, prompt.grad = prompt.grad, None
    return loss.item(), grad


@pytest.mark.parametrize("tied", [False, True])
def test_cast_once_is_bit_identical_and_restores_the_model(tiny_llama, tied):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    before = {name: param for name, param in model.named_parameters(remove_duplicate=False)}
    prompt = torch.nn.Parameter(torch.randn(2, 3, model.config.hidden_size) * 0.1)
    expected = _loss_and_grad(model, prompt)

    with FrozenWeightCast(model, torch.bfloat16) as cast:
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.bfloat16
        # The embedding lookup keeps float32, tied or not.
        assert model.model.embed_tokens.weight.dtype == torch.float32
        got = _loss_and_grad(model, prompt)
        with cast.originals():
            assert model.lm_head.weight is before["lm_head.weight"]

    assert got[0] == expected[0]
    assert torch.equal(got[1], expected[1])
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[name] is param for name, param in before.items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_trainable_and_non_float32_weights_are_left_alone(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with FrozenWeightCast(model, torch.bfloat16):
        assert model.lm_head.weight.dtype == torch.float32
    with FrozenWeightCast(model, None):  # no autocast: nothing to do
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_prompt_tuning_under_autocast_leaves_float32_weights(tiny_llama, train_rows):
    records = [TrainGenerationRecord(**row) for row in train_rows[:16]]
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftPromptTuning.train(
        str(tiny_llama),
        records,
        TuningConfig(num_virtual_tokens=4, prompt_tuning_init_method="RANDOM"),
        num_epochs=1,
        batch_size=4,
        validation={"split_ratio": 0.25, "eval_steps": 2, "accuracy_examples": 2},
    )
    assert model.training_config["autocast"] == "bfloat16"
    assert any("validation_accuracy" in entry for entry in model.training_logs)
    trained = dict(model.base.model.named_parameters())
    for name, param in fresh.named_parameters():
        assert trained[name].dtype == torch.float32 and torch.equal(trained[name], param), name
