"""Fused Llama-family layers: transformers' forward values, gradients as close to float32
as transformers' own, and the model unchanged afterwards."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from caikit_tuning.data import Example, collate_packed
from caikit_tuning.inputs import PromptPrefix
from caikit_tuning.training import summed_token_loss
from caikit_tuning.training.fused_layers import fused_decoder_layers
from caikit_tuning.training.precision import FrozenWeightCast
from caikit_tuning.training.segment_attention import segment_attention

EXAMPLES = [
    Example([3, 10, 11, 12, 13, 40, 41], [20, 1]),
    Example([3, 14, 50], [21, 22, 23, 1]),
    Example([3, 60, 61, 62, 63, 64], [24, 1]),
]


def _frozen(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model.requires_grad_(False)


def _tiny(config_class, **extra):
    """A 2-layer model of another Llama-family architecture, in memory."""
    torch.manual_seed(1)
    config = config_class(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        attn_implementation="sdpa",
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):  # Qwen2's q/k/v biases, zero at init
            parameter.data.normal_(0, 0.2)
    return model.requires_grad_(False)


OTHER_FAMILIES = {
    # A window shorter than the packed row, so that it changes the result.
    "mistral": lambda: _tiny(MistralConfig, sliding_window=8),
    "qwen2": lambda: _tiny(Qwen2Config, use_sliding_window=False),
}


def _loss_and_grad(model, prompt, autocast=True):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = summed_token_loss(model, collate_packed(EXAMPLES), PromptPrefix(decoder=prompt))
    loss.backward()
    grad, prompt.grad = prompt.grad, None
    return loss.item(), grad


@pytest.mark.parametrize("family", ["llama", *OTHER_FAMILIES])
@pytest.mark.parametrize("per_example", [False, True])
def test_same_loss_and_a_gradient_as_close_to_float32(tiny_llama, family, per_example):
    model = _frozen(tiny_llama) if family == "llama" else OTHER_FAMILIES[family]()
    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(4, model.config.hidden_size) * 0.5)
    with segment_attention(model, enabled=per_example):
        _, exact = _loss_and_grad(model, prompt, autocast=False)
        with FrozenWeightCast(model, torch.bfloat16) as cast:
            loss, grad = _loss_and_grad(model, prompt)
            with fused_decoder_layers(model, cast.dtype) as fused:
                assert fused == model.config.num_hidden_layers
                fused_loss, fused_grad = _loss_and_grad(model, prompt)

    assert fused_loss == loss  # the forward rounds where transformers rounds

    def error(g):
        return ((g - exact).norm() / exact.norm()).item()

    assert error(grad) < 0.05
    assert error(fused_grad) <= error(grad) * 1.25


def test_the_model_is_unchanged_after_and_generation_inside_runs_unfused(tiny_llama):
    model = _frozen(tiny_llama)
    layer = model.model.layers[0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompt_ids = torch.tensor([[3, 10, 11, 12]])
    expected = model.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    with FrozenWeightCast(model, torch.bfloat16) as cast, fused_decoder_layers(model, cast.dtype):
        assert "forward" in vars(layer)
        # Weights are views into the concatenated ones: no second copy.
        qkv = layer.self_attn.q_proj.weight
        assert (
            qkv.untyped_storage().data_ptr()
            == layer.self_attn.v_proj.weight.untyped_storage().data_ptr()
        )
        with cast.originals():  # float32 and a cache: transformers' forward
            assert torch.equal(
                model.generate(prompt_ids, max_new_tokens=5, do_sample=False), expected
            )
    assert "forward" not in vars(layer)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert torch.equal(model.generate(prompt_ids, max_new_tokens=5, do_sample=False), expected)


def test_trainable_or_wrapped_projections_and_float32_runs_are_not_fused(tiny_llama):
    model = _frozen(tiny_llama)
    with FrozenWeightCast(model, None) as cast, fused_decoder_layers(model, cast.dtype) as fused:
        assert fused == 0  # no autocast
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with (
        FrozenWeightCast(lora, torch.bfloat16) as cast,
        fused_decoder_layers(lora, cast.dtype) as fused,
    ):
        assert fused == 0
