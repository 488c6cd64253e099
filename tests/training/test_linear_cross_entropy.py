"""The fused LM head and loss give the unfused path's loss and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from caikit_tuning.data import Example, collate_causal, collate_packed
from caikit_tuning.inputs import PromptPrefix
from caikit_tuning.training import linear_cross_entropy as fused_module
from caikit_tuning.training import summed_token_loss
from caikit_tuning.training.linear_cross_entropy import fused_head, linear_cross_entropy

EXAMPLES = [
    Example([3, 10, 11, 12, 13], [20, 1]),
    Example([3, 14], [21, 22, 1]),
    Example([3, 15, 16, 17], [23, 1], source_targets=(2,)),
]


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def losses_and_grads(function, hidden, weight, targets):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = function(hidden, weight, targets)
    (2.5 * loss).backward()  # a scale on the way back, as the loop divides by tokens
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("rows_per_chunk", [7, 1000])
def test_equals_cross_entropy_of_the_linear_layer_with_ignored_targets(monkeypatch, rows_per_chunk):
    torch.manual_seed(0)
    vocab, width = 50, 16
    monkeypatch.setattr(fused_module, "rows_per_chunk", lambda vocab: rows_per_chunk)
    hidden, weight = torch.randn(23, width), torch.randn(vocab, width)
    targets = torch.randint(0, vocab, (23,))
    targets[[0, 5, 22]] = -100
    expected = losses_and_grads(reference, hidden, weight, targets)
    got = losses_and_grads(linear_cross_entropy, hidden, weight, targets)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert got[1][[0, 5, 22]].abs().sum() == 0  # ignored positions get no gradient


def test_under_autocast_its_error_is_the_unfused_paths():
    """Both round to bfloat16 (at slightly different points); against float32, the
    fused loss and gradients are as close as the unfused ones."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 32), torch.randn(300, 32) * 0.1
    targets = torch.randint(0, 300, (40,))
    exact = losses_and_grads(reference, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused_ = losses_and_grads(reference, hidden, weight, targets)
        fused = losses_and_grads(linear_cross_entropy, hidden, weight, targets)
    for want, theirs, ours in zip(exact, unfused_, fused, strict=True):
        assert ours.dtype == want.dtype

        def error(x, want=want):
            return ((x - want).norm() / want.norm()).item()

        assert error(ours) <= 1.5 * error(theirs) + 1e-6
        assert error(ours) < 0.02


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (5,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, targets))


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def unfused(monkeypatch):
    monkeypatch.setattr("caikit_tuning.training.loss.fused_head", lambda model: None)


@pytest.mark.parametrize("collate", [collate_packed, lambda e: collate_causal(e, pad_id=0)])
def test_the_training_loss_and_prompt_gradient_match_the_unfused_model(model, monkeypatch, collate):
    assert fused_head(model) is not None
    torch.manual_seed(0)
    start = torch.randn(3, model.config.hidden_size) * 0.1

    def run():
        prompt = torch.nn.Parameter(start.clone())
        loss = summed_token_loss(model, collate(EXAMPLES), PromptPrefix(decoder=prompt))
        loss.backward()
        return loss.detach(), prompt.grad

    fused_loss, fused_grad = run()
    unfused(monkeypatch)
    loss, grad = run()
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-6)


def test_a_trainable_head_gets_the_unfused_gradient(model, monkeypatch):
    def head_grad():
        trained = copy.deepcopy(model)
        for parameter in trained.parameters():
            parameter.requires_grad_(False)
        trained.get_output_embeddings().weight.requires_grad_(True)
        summed_token_loss(trained, collate_packed(EXAMPLES), PromptPrefix()).backward()
        return trained.get_output_embeddings().weight.grad

    fused = head_grad()
    unfused(monkeypatch)
    torch.testing.assert_close(fused, head_grad(), rtol=1e-4, atol=1e-6)


def test_heads_it_cannot_fuse_keep_the_models_own_forward(model, tiny_t5):
    from transformers import AutoModelForSeq2SeqLM

    assert fused_head(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)) is None
    assert fused_head(torch.compile(model)) is None
    with_bias = copy.deepcopy(model)
    head = with_bias.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    assert fused_head(with_bias) is None
