"""The packed loss equals the padded loss on the same examples, soft prompts included."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from caikit_tuning.data import Example, collate_causal, collate_packed
from caikit_tuning.inputs import PromptPrefix
from caikit_tuning.training import summed_token_loss


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


EXAMPLES = [
    Example([3, 10, 11, 12, 13], [20, 1]),
    Example([3, 14], [21, 22, 1]),
    Example([3, 15, 16, 17], [23, 1], source_targets=(2,)),
]


@pytest.mark.parametrize("virtual", [0, 3])
def test_packed_and_padded_losses_agree(model, virtual):
    torch.manual_seed(0)
    prefix = (
        PromptPrefix(decoder=torch.randn(virtual, model.config.hidden_size) * 0.1)
        if virtual
        else PromptPrefix()
    )
    with torch.no_grad():
        padded = summed_token_loss(model, collate_causal(EXAMPLES, pad_id=0), prefix)
        packed = summed_token_loss(model, collate_packed(EXAMPLES), prefix)
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def test_packed_gradients_reach_every_examples_prompt(model):
    prompts = torch.nn.Parameter(torch.randn(3, 2, model.config.hidden_size) * 0.1)  # per example
    loss = summed_token_loss(model, collate_packed(EXAMPLES), PromptPrefix(decoder=prompts))
    loss.backward()
    assert all(prompts.grad[i].abs().sum() > 0 for i in range(3))


def test_packed_batch_has_no_padding():
    batch = collate_packed(EXAMPLES)
    assert batch.num_padded_tokens == 0 and batch.input_ids.shape == (
        1,
        sum(len(e) for e in EXAMPLES),
    )
    assert batch.segment_lengths == [7, 5, 6]
    assert batch.num_target_tokens == 2 + 3 + 3
