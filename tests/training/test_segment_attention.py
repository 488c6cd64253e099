"""Per-example attention on packed rows gives what separate examples give."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from caikit_tuning.data import Example, collate_packed
from caikit_tuning.inputs import PromptPrefix
from caikit_tuning.training import segment_attention as segment_module
from caikit_tuning.training import summed_token_loss
from caikit_tuning.training.segment_attention import (
    NAME,
    group_segments,
    matmul_attention,
    sdpa_attention,
    segment_attention,
    uses_segment_attention,
)

EXAMPLES = [
    Example([3, 10, 11, 12, 13], [20, 1]),
    Example([3, 14], [21, 22, 1]),
    Example([3, 15, 16, 17, 18, 19, 23], [24, 1]),
]


def _model(folder):
    # The tiny llama has 4 query heads over 2 key/value heads: grouped-query attention.
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.requires_grad_(False).eval()


# Positions per attention call on the CPU: one example a call, two of the three
# examples together, all of them (the default for these short examples).
CHUNKS = [1, 13, segment_module.CPU_CHUNK_POSITIONS]


def test_consecutive_segments_are_grouped_up_to_the_limit():
    assert group_segments([4, 9, 6], 1) == [(4,), (9,), (6,)]
    assert group_segments([4, 9, 6], 13) == [(4, 9), (6,)]
    assert group_segments([4, 20, 6, 3], 13) == [(4,), (20,), (6, 3)]
    assert group_segments([4, 9, 6], 128) == [(4, 9, 6)]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_packed_row_matches_examples_run_one_by_one(tiny_llama, monkeypatch, chunk):
    monkeypatch.setattr(segment_module, "CPU_CHUNK_POSITIONS", chunk)
    model = _model(tiny_llama)
    lengths = [4, 9, 6]
    ids = torch.randint(4, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = [0, 4, 13]
    with torch.no_grad():
        alone = torch.cat(
            [
                model(input_ids=ids[:, s : s + n]).logits
                for s, n in zip(starts, lengths, strict=True)
            ],
            dim=1,
        )
        dense = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        with segment_attention(model) as switched:
            assert switched and model.config._attn_implementation == NAME
            split = model(
                input_ids=ids, position_ids=positions, use_cache=False, segment_lengths=lengths
            ).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(split, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("prompt_shape", ["shared", "per_example", "none"])
def test_training_loss_and_prompt_gradient_match_the_dense_mask(
    tiny_llama, monkeypatch, prompt_shape, chunk
):
    monkeypatch.setattr(segment_module, "CPU_CHUNK_POSITIONS", chunk)
    # "shared": one prompt for the batch, in the row once; "per_example": multitask
    # prompts, a copy per example. The middle example's first token is a target (as a
    # chat's assistant turn can be), predicted from the position before the example.
    model = _model(tiny_llama)
    hidden = model.config.hidden_size
    shape = {"shared": (2, hidden), "per_example": (3, 2, hidden), "none": None}[prompt_shape]
    seed = torch.Generator().manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(shape, generator=seed) * 0.1) if shape else None
    examples = [EXAMPLES[0], Example([14, 3], [21, 22, 1], source_targets=(0,)), EXAMPLES[2]]
    batch = collate_packed(examples)
    embeddings = model.get_input_embeddings().weight.requires_grad_(True)
    rows = []
    model.model.layers[0].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[1]))

    def loss_and_grads():
        loss = summed_token_loss(model, batch, PromptPrefix(decoder=prompt))
        loss.backward()
        grads = [p.grad for p in (embeddings, prompt) if p is not None]
        for p in (embeddings, prompt):
            if p is not None:
                p.grad = None
        return loss.detach(), grads

    dense = loss_and_grads()
    with segment_attention(model):
        assert uses_segment_attention(model)
        split = loss_and_grads()
    torch.testing.assert_close(split[0], dense[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(split[1], dense[1], strict=True):
        assert expected.abs().sum() > 0
        # float32 sums in another order: close relative to the gradient's scale.
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    # The shared prompt is in the row once instead of once per example.
    tokens = batch.num_real_tokens
    assert rows == {"shared": [tokens + 6, tokens + 2], "per_example": [tokens + 6] * 2}.get(
        prompt_shape, [tokens] * 2
    )


def test_without_segment_lengths_it_is_sdpa_with_its_masks(tiny_llama):
    # Generation and padded validation batches run while the model is switched.
    model = _model(tiny_llama)
    ids = torch.tensor([[0, 0, 3, 10, 11], [3, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with segment_attention(model):
            got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()])


def test_only_decoder_models_on_sdpa_are_switched(tiny_llama, tiny_t5):
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    with segment_attention(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"
    with segment_attention(_model(tiny_llama), enabled=False) as switched:
        assert not switched
    from transformers import AutoModelForSeq2SeqLM

    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    before = seq2seq.config._attn_implementation
    with segment_attention(seq2seq) as switched:
        assert not switched and seq2seq.config._attn_implementation == before


@pytest.mark.parametrize("prefix", [0, 3])
def test_matmul_attention_on_cpu_equals_sdpa_used_on_gpus(prefix):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, 4, prefix + 5, 8, generator=generator) for _ in range(2))
    expected = sdpa_attention(q, k, v, (5,), prefix, 0.0, 0.5)
    got = matmul_attention(q, k, v, (5,), prefix, 0.0, 0.5)
    torch.testing.assert_close(got, expected)
    (grad_expected,) = torch.autograd.grad(expected.sum(), q)
    (grad_got,) = torch.autograd.grad(got.sum(), q)
    torch.testing.assert_close(grad_got, grad_expected)


def _eager_attention(q, k, v, allowed, scale):
    # The formula as separate operators under autograd, as transformers' eager attention.
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).float()
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(weights, v)


@pytest.mark.parametrize("scale", [0.125, 8**-0.5])  # a power of two, and not
@pytest.mark.parametrize(("lengths", "prefix"), [((7,), 0), ((7,), 4), ((3, 5, 2), 4)])
def test_matmul_attention_is_bit_identical_to_the_eager_formula_under_bf16(lengths, prefix, scale):
    generator = torch.Generator().manual_seed(0)
    n = sum(lengths)
    q, k, v = (
        torch.randn(1, 4, size, 8, generator=generator).bfloat16().requires_grad_()
        for size in (n, prefix + n, prefix + n)
    )
    grad_out = torch.randn(1, 4, n, 8, generator=generator).bfloat16()
    allowed = segment_module.segment_mask(lengths, prefix, q.device)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() if allowed is None else allowed
    results = []
    for attention in (
        lambda: _eager_attention(q, k, v, allowed, scale),
        lambda: matmul_attention(q, k, v, lengths, prefix, 0.0, scale),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention()
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, expected in zip(results[1], results[0], strict=True):
        assert got.dtype == expected.dtype == torch.bfloat16
        assert torch.equal(got, expected)


def test_large_masks_are_built_per_call_and_small_ones_kept():
    cpu = torch.device("cpu")
    small = segment_module.segment_bias((9,), 2, cpu, torch.bfloat16)
    assert segment_module.segment_bias((9,), 2, cpu, torch.bfloat16) is small
    assert small[0, :3].eq(0).all() and small[0, 3:].eq(float("-inf")).all()
    side = int(segment_module.KEPT_MASK_ELEMENTS**0.5) + 1
    large = segment_module.segment_bias((side,), 0, cpu, torch.bfloat16)
    assert segment_module.segment_bias((side,), 0, cpu, torch.bfloat16) is not large
    assert torch.equal(large, segment_module.segment_bias((side,), 0, cpu, torch.bfloat16))


def test_a_packed_row_with_grouped_keys_matches_the_eager_formula_per_example_under_bf16():
    # 6 query heads over 2 key heads, a 3-position prompt every example sees, and three
    # examples, as segment_attention_forward runs them on the CPU (one call per example).
    generator = torch.Generator().manual_seed(0)
    prefix, lengths, heads, key_heads = 3, [5, 2, 4], 6, 2
    row = prefix + sum(lengths)
    # Queries, keys and values as views of one projection output, as a decoder layer has.
    qkv = torch.randn(1, row, heads + 2 * key_heads, 8, generator=generator).bfloat16()
    grad_out = torch.randn(1, row, heads, 8, generator=generator).bfloat16()

    class Attention(torch.nn.Module):
        num_key_value_groups = heads // key_heads

    def eager(q, k, v):
        k, v = (t.repeat_interleave(heads // key_heads, dim=1) for t in (k, v))
        pieces, start = (
            [
                _eager_attention(
                    q[:, :, :prefix],
                    k[:, :, :prefix],
                    v[:, :, :prefix],
                    torch.ones(prefix, prefix, dtype=torch.bool).tril(),
                    0.125,
                )
            ],
            prefix,
        )
        for n in lengths:
            keys = torch.cat([torch.arange(prefix), torch.arange(start, start + n)])
            allowed = segment_module.segment_mask((n,), prefix, q.device)
            pieces.append(
                _eager_attention(
                    q[:, :, start : start + n], k[:, :, keys], v[:, :, keys], allowed, 0.125
                )
            )
            start += n
        return torch.cat(pieces, dim=2).transpose(1, 2)

    def packed(q, k, v):
        return segment_module.segment_attention_forward(
            Attention(), q, k, v, None, scaling=0.125, segment_lengths=lengths, prefix_length=prefix
        )[0]

    results = []
    for attention in (eager, packed):
        leaf = qkv.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.split([heads, key_heads, key_heads], dim=2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(q, k, v)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        results.append((out, grad))
    (expected, expected_grad), (got, got_grad) = results
    assert got.dtype == torch.bfloat16 and got.shape == (1, row, heads, 8)
    assert torch.equal(got, expected)
    # Queries' gradients are the same products; a key's sums its query heads in float32
    # where the eager formula adds per-head gradients rounded to bfloat16.
    assert torch.equal(got_grad[:, :, :heads], expected_grad[:, :, :heads])
    torch.testing.assert_close(
        got_grad, expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max().item()
    )
