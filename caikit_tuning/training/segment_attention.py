"""Attention for packed training rows: each example attends within itself only.

A packed row holds a batch's examples one after another, with position ids restarting
per example. transformers' SDPA path then builds a dense (row x row) block-causal
mask, so attention costs the square of the whole row and the masked-out blocks are
computed anyway. This implementation runs causal attention on each example's slice
instead: the same result for a fraction of the work (measured on SmolLM2-135M, CPU,
bfloat16 autocast, a 472-token row of 8 examples, forward plus backward: 710 ms with
the dense mask, 617 ms per example). On GPUs the dense mask would also keep SDPA off
its flash kernels. On the CPU, short consecutive examples share a call (see
`CPU_CHUNK_POSITIONS`): each call has a fixed cost that their attention does not repay.

A soft prompt shared by every example of a batch can also be computed once, at the
front of the row: under causal attention its hidden states do not depend on what
follows, so every example attending to that one copy gives what a copy per example
gives, for fewer positions through every layer.

Without `segment_lengths` (generation, validation of padded batches) it is plain SDPA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "caikit_tuning_segments"

# On the CPU, consecutive examples of up to this many positions in all share one
# attention call under a block-diagonal mask: for short examples the calls' fixed cost
# outweighs the masked-out work (measured, SmolLM2-135M layer shapes, forward and
# backward: 8 examples of 25-60 tokens 4.2-5.4 ms at 128 against 7.3-10.1 ms one call
# each; 512 positions: 13.5-30 ms). GPUs keep one call per example, on SDPA's kernels.
CPU_CHUNK_POSITIONS = 128


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_lengths: list[int] | None = None,
    prefix_length: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: (1, heads, row, head_dim); key, value: (1, kv_heads, row, head_dim).

    The row is `prefix_length` positions every example sees (a soft prompt computed
    once for the batch), then examples of `segment_lengths`. Returns
    (1, row, heads, head_dim), as transformers' attention functions do."""
    if segment_lengths is None or query.shape[0] != 1:
        # The mask transformers built for this implementation is the SDPA one.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or not fits_window(
        kwargs.get("sliding_window"), prefix_length + max(segment_lengths)
    ):
        raise ValueError("per-example attention supports neither logit soft-capping nor windows")
    chunks = group_segments(segment_lengths, CPU_CHUNK_POSITIONS if query.is_cpu else 1)
    if query.is_cpu and not dropout:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        calls, gather = _row_calls(chunks, prefix_length, query.shape[1] // key.shape[1], query)
        return _attention(query, key, value, calls, gather, scale), None
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sizes = [sum(chunk) for chunk in chunks]
    sizes = [prefix_length, *sizes] if prefix_length else sizes
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    if not prefix_length:
        pieces = [
            sdpa_attention(q, k, v, chunk, 0, dropout, scaling)
            for chunk, q, k, v in zip(chunks, queries, keys, values, strict=True)
        ]
    else:
        # The prompt attends to itself; each example to the prompt and causally to itself.
        prompt_key, prompt_value = keys[0], values[0]
        pieces = [
            sdpa_attention(queries[0], prompt_key, prompt_value, sizes[:1], 0, dropout, scaling)
        ]
        for chunk, q, k, v in zip(chunks, queries[1:], keys[1:], values[1:], strict=True):
            pieces.append(
                sdpa_attention(
                    q,
                    torch.cat([prompt_key, k], dim=2),
                    torch.cat([prompt_value, v], dim=2),
                    chunk,
                    prefix_length,
                    dropout,
                    scaling,
                )
            )
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def group_segments(lengths: list[int], limit: int) -> list[tuple[int, ...]]:
    """Consecutive segment lengths in groups of at most `limit` positions (a longer
    segment alone), each group one attention call."""
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    for n in lengths:
        if current and sum(current) + n > limit:
            groups.append(tuple(current))
            current = []
        current.append(n)
    return [*groups, tuple(current)] if current else groups


def segment_mask(
    lengths: tuple[int, ...], prefix: int, device: torch.device
) -> torch.Tensor | None:
    """(positions, prefix + positions) True where a query of these consecutive segments
    may attend: the prefix and, causally, its own segment. None for one segment without
    a prefix (plain causal attention). The same for every layer: kept while small."""
    if len(lengths) == 1 and not prefix:
        return None
    return _kept(_segment_mask, lengths, prefix, device)


def segment_bias(
    lengths: tuple[int, ...],
    prefix: int,
    device: torch.device,
    dtype: torch.dtype,
    groups: int = 1,
) -> torch.Tensor:
    """`segment_mask` as an additive bias of `dtype` (0 where allowed, -inf elsewhere),
    causal where the mask would be None; each query's row repeated `groups` times (the
    query heads that share a key head, stacked by position: see `_Attention`)."""
    return _kept(_segment_bias, lengths, prefix, device, dtype, groups, rows_each=groups)


# Masks and biases up to this many elements are kept between calls: every layer, and
# every step with the same example lengths, reuses them (at most 64 of 2 MB each).
KEPT_MASK_ELEMENTS = 2**20


def _kept(build, lengths, prefix, *args, rows_each=1):
    total = sum(lengths)
    if total * rows_each * (prefix + total) > KEPT_MASK_ELEMENTS:
        return build.__wrapped__(lengths, prefix, *args)
    return build(lengths, prefix, *args)


@functools.lru_cache(maxsize=64)
def _segment_mask(lengths: tuple[int, ...], prefix: int, device: torch.device) -> torch.Tensor:
    total = sum(lengths)
    allowed = torch.zeros(total, prefix + total, dtype=torch.bool, device=device)
    allowed[:, :prefix] = True
    start = prefix
    for n in lengths:
        rows = slice(start - prefix, start - prefix + n)
        allowed[rows, start : start + n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        start += n
    return allowed


@functools.lru_cache(maxsize=64)
def _segment_bias(
    lengths: tuple[int, ...], prefix: int, device: torch.device, dtype: torch.dtype, groups: int
) -> torch.Tensor:
    allowed = _segment_mask.__wrapped__(lengths, prefix, device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
        ~allowed, float("-inf")
    )
    return bias.repeat_interleave(groups, dim=0) if groups > 1 else bias


def sdpa_attention(q, k, v, lengths, prefix, dropout, scaling):
    """(batch, heads, n, dim) queries of consecutive segments of `lengths` over
    (batch, heads, prefix + n, dim) keys: each query attends to the prefix and, causally,
    to its own segment (`segment_mask`)."""
    mask = segment_mask(tuple(lengths), prefix, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None
    )


def matmul_attention(q, k, v, lengths, prefix, dropout, scaling):
    """`sdpa_attention` as `_Attention`'s matmuls and float32 softmax, in one call (with
    dropout it is `sdpa_attention`). k and v may have fewer heads than q (grouped-query
    attention)."""
    if dropout > 0:
        return sdpa_attention(q, k, v, lengths, prefix, dropout, scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    n, groups = sum(lengths), q.shape[1] // k.shape[1]
    bias = segment_bias(tuple(lengths), prefix, q.device, _matmul_dtype(q), groups)
    calls = [_Call(0, n, slice(0, prefix + n), bias)]
    return _attention(q, k, v, calls, None, scale).transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One attention call of `_Attention`: queries start..start+size over `keys`."""

    start: int
    size: int
    keys: slice  # positions of the keys, or of the gathered keys where there are some
    bias: torch.Tensor  # (size x groups, keys), as `segment_bias` with `groups`


def _row_calls(chunks, prefix, groups, query):
    """The calls for a packed row of `prefix` positions, then `chunks` of segments, and
    the key positions to gather so that each call's keys are consecutive (None: no
    prefix, so they already are): the prefix, then each chunk after its own prefix copy."""
    dtype, device = _matmul_dtype(query), query.device
    calls, gather, start = [], [], 0
    if prefix:
        calls.append(
            _Call(0, prefix, slice(0, prefix), segment_bias((prefix,), 0, device, dtype, groups))
        )
        gather.append(torch.arange(prefix))
        start = prefix
    at = start
    for chunk in chunks:
        n = sum(chunk)
        bias = segment_bias(chunk, prefix, device, dtype, groups)
        if prefix:
            calls.append(_Call(start, n, slice(at, at + prefix + n), bias))
            gather += [torch.arange(prefix), torch.arange(start, start + n)]
            at += prefix + n
        else:
            calls.append(_Call(start, n, slice(start, start + n), bias))
        start += n
    return calls, torch.cat(gather).to(device) if prefix else None


def _matmul_dtype(query: torch.Tensor) -> torch.dtype:
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _attention(query, key, value, calls, gather, scale):
    dtype = _matmul_dtype(query)
    with torch.autocast(query.device.type, enabled=False):
        return _Attention.apply(
            query.to(dtype), key.to(dtype), value.to(dtype), calls, gather, scale
        )


class _Attention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v for each of `calls` over a (1, heads, row, dim)
    query and (1, key heads, row, dim) keys and values, written into one (1, row, heads,
    dim) output: the layout the attention output projection reads, so there is no
    concatenation or transpose after it. The queries of the heads that share a key head
    are stacked (position-major) into one matrix against that head's keys, so grouped keys
    and values are never repeated and each call is three batched products, not one per
    query head. The scores are rounded to the matmul dtype before the scale and the
    float32 softmax, as transformers' eager formula rounds them; a power-of-two scale
    (head sizes 64, 256) is exact, so it goes into the matmuls, and another is applied in
    the matmul dtype to the scores and their gradient, where the eager formula rounds it.

    For one query head per key head the results are bit-identical to the eager formula's
    under autograd. With more, the forward still is, and a key or value gradient sums
    its heads in float32 inside the product (the eager formula sums per-head gradients
    rounded to the matmul dtype). Measured on SmolLM2-135M layer shapes (9 query heads
    over 3 key heads), 2 CPU cores, bf16, a packed row of a 20-token prompt and 8
    examples, forward and backward, in one process alternating with the previous form (a
    node per call over repeated keys, concatenated after): 25-60-token examples 4.2-5.0
    ms against 4.7-5.6 (paired ratio 0.88-0.90 in three runs), 170-223-token examples
    no faster (0.98-1.01: there the time is in the products and the softmax)."""

    @staticmethod
    def forward(ctx, query, key, value, calls, gather, scale):
        heads, key_heads = query.shape[1], key.shape[1]
        groups, row, dim = heads // key_heads, query.shape[2], query.shape[3]
        q, k, v = query[0], key[0], value[0]
        if gather is not None:
            k, v = k.index_select(1, gather), v.index_select(1, gather)
        exact = math.frexp(scale)[0] == 0.5
        out = query.new_empty(1, row, heads, dim)
        saved = []
        for call in calls:
            n = call.size
            stacked = _stack(q[:, call.start : call.start + n], key_heads, groups)
            keys, values = k[:, call.keys], v[:, call.keys]
            scores = torch.baddbmm(
                call.bias, stacked, keys.transpose(1, 2), alpha=scale if exact else 1.0
            )
            if not exact:
                scores.mul_(scale)
            probs = torch.softmax(scores, -1, dtype=torch.float32)
            weights = probs.to(q.dtype)
            _unstack(torch.bmm(weights, values), out[0, call.start : call.start + n], groups)
            saved += [stacked, probs, weights]
        ctx.save_for_backward(k, v, *saved)
        ctx.calls, ctx.gather, ctx.scale, ctx.exact = calls, gather, scale, exact
        ctx.key_shape = key.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        k, v, *saved = ctx.saved_tensors
        key_heads, groups = k.shape[0], grad_out.shape[2] // k.shape[0]
        grad_q = grad_out.new_empty(grad_out.shape, dtype=k.dtype)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        for i, call in enumerate(ctx.calls):
            stacked, probs, weights = saved[3 * i : 3 * i + 3]
            n = call.size
            keys, values = k[:, call.keys], v[:, call.keys]
            grad = _stack(
                grad_out[0, call.start : call.start + n].transpose(0, 1), key_heads, groups
            )
            grad = grad.to(k.dtype)
            grad_v[:, call.keys] = torch.bmm(weights.transpose(1, 2), grad)
            grad_weights = torch.bmm(grad, values.transpose(1, 2)).float()
            grad_scores = torch._softmax_backward_data(grad_weights, probs, -1, torch.float32)
            grad_scores = grad_scores.to(k.dtype)
            if not ctx.exact:
                grad_scores.mul_(ctx.scale)
            grad_stacked = torch.bmm(grad_scores, keys)
            grad_keys = torch.bmm(grad_scores.transpose(1, 2), stacked)
            if ctx.exact:
                grad_stacked.mul_(ctx.scale)
                grad_keys.mul_(ctx.scale)
            _unstack(grad_stacked, grad_q[0, call.start : call.start + n], groups)
            grad_k[:, call.keys] = grad_keys
        if ctx.gather is not None:  # a prefix key's gradient: the sum over its copies
            rows = ctx.key_shape[2]
            grad_k = grad_k.new_zeros(key_heads, rows, k.shape[-1]).index_add_(
                1, ctx.gather, grad_k
            )
            grad_v = grad_v.new_zeros(key_heads, rows, v.shape[-1]).index_add_(
                1, ctx.gather, grad_v
            )
        return grad_q.transpose(1, 2), grad_k[None], grad_v[None], None, None, None


def _stack(q: torch.Tensor, key_heads: int, groups: int) -> torch.Tensor:
    """(heads, n, dim) queries as (key heads, n x groups, dim): row i x groups + g is
    position i of the g-th query head over that key head (transformers' `repeat_kv`
    order). A copy."""
    heads, n, dim = q.shape
    return q.view(key_heads, groups, n, dim).transpose(1, 2).reshape(key_heads, n * groups, dim)


def _unstack(stacked: torch.Tensor, out: torch.Tensor, groups: int) -> None:
    """Write `_stack`ed (key heads, n x groups, dim) rows into (n, heads, dim) `out`."""
    key_heads, rows, dim = stacked.shape
    n = rows // groups
    out.view(n, key_heads, groups, dim).copy_(
        stacked.view(key_heads, n, groups, dim).transpose(0, 1)
    )


def fits_window(window: int | None, length: int) -> bool:
    """Whether a sequence of `length` fits in a sliding attention window (None: no window)."""
    return window is None or length <= window


def _register() -> None:
    AttentionInterface.register(NAME, segment_attention_forward)
    # Masks (for the fallback) are built exactly as for SDPA.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


_register()


@contextlib.contextmanager
def segment_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Switch a decoder-only model that uses SDPA to per-example attention for the
    block; yields whether it did. The caller passes `segment_lengths` to the forward."""
    config = model.config
    switch = (
        enabled
        and not config.is_encoder_decoder
        and getattr(config, "_attn_implementation", None) == "sdpa"
    )
    if not switch:
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


def uses_segment_attention(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME
