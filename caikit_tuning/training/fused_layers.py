"""Llama-family decoder layers (Llama, Mistral, Qwen2) as fewer, larger operations, for
training frozen layers under autocast.

Prompt tuning trains none of the decoder's weights, yet transformers' Llama layer runs
each step as many small operations, and on the CPU their count, not their arithmetic,
is a large part of a short example's step. Within `fused_decoder_layers`, a layer whose
projections are all frozen and already in the autocast dtype (`FrozenWeightCast`) runs:

- the query, key and value projections as one matmul, and the MLP's gate and up
  projections as another, over weights concatenated once for the run (the per-module
  weights become views into them, so this costs no memory);
- each RMSNorm as one autograd node that emits the autocast dtype its matmul would cast
  to, so its input is cast once, not once per projection;
- rotary embeddings for queries and keys together as one autograd node, computed in
  float32 as transformers computes them and rounded once; its gradient is summed in
  float32 (transformers sums the query gradient's two paths in bfloat16);
- SwiGLU (`silu(gate) * up`) as one node whose gradient is written into one tensor.

Measured on SmolLM2-135M prompt tuning, 2 CPU cores, the whole loop: 20 short-example
steps 9.2-9.5 s against 10.3-10.6 s for transformers' layers, 10 long-example steps
21.0-21.2 s against 23.6-23.8 s. The forward values are those of transformers' layer:
the same products, rounded at the same points. Gradients differ by float32 summation
order and fewer bfloat16 roundings, and are as close to float32 as transformers' own
(benchmarks/gradient_precision.py). Outside autocast, with a cache (generation), or
while `FrozenWeightCast` has the float32 weights back, a layer runs transformers' own
forward.

Measured and not taken (the 30-layer decoder's forward and backward on a 1,648-position
long row, 10 pairs alternating in one process): a rotary node over the whole q/k/v
output that writes its gradient into one tensor instead of the split's concatenation,
paired ratio 1.000; a rotation without the roll (each half times the other half of sin)
was 1.29x slower on its own, since a bfloat16-by-float32 product copies its input first
on the CPU. SwiGLU in row blocks (to stay in cache) was 1.15-1.9x slower alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2


@dataclass(frozen=True)
class _Family:
    """A decoder layer class whose forward is Llama's, with the classes it must hold and
    the sliding window its attention passes to the attention function (None: passes none)."""

    attention: type
    mlp: type
    norm: type
    eager: Callable
    window: Callable[[torch.nn.Module], int | None] | None = None


# Mistral and Qwen2 layers are Llama's but for attention biases (Qwen2's q/k/v) and a
# sliding window handed to the attention function.
_FAMILIES = {
    llama.LlamaDecoderLayer: _Family(
        llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm, llama.eager_attention_forward
    ),
    mistral.MistralDecoderLayer: _Family(
        mistral.MistralAttention,
        mistral.MistralMLP,
        mistral.MistralRMSNorm,
        mistral.eager_attention_forward,
        lambda attn: getattr(attn.config, "sliding_window", None),
    ),
    qwen2.Qwen2DecoderLayer: _Family(
        qwen2.Qwen2Attention,
        qwen2.Qwen2MLP,
        qwen2.Qwen2RMSNorm,
        qwen2.eager_attention_forward,
        lambda attn: attn.sliding_window,
    ),
}


@contextlib.contextmanager
def fused_decoder_layers(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Fuse every eligible decoder layer of `model` for autocast to `dtype` (None: none)
    within the block; yields how many were fused. Layers are restored on exit."""
    layers = [] if dtype is None else [m for m in model.modules() if _eligible(m, dtype)]
    fused = [_FusedLayer(layer, dtype) for layer in layers]
    try:
        yield len(fused)
    finally:
        for layer in fused:
            layer.restore()


def _eligible(layer: torch.nn.Module, dtype: torch.dtype) -> bool:
    family = _FAMILIES.get(type(layer))
    if family is None:
        return False
    if type(layer.self_attn) is not family.attention or type(layer.mlp) is not family.mlp:
        return False
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(type(n) is family.norm for n in norms):
        return False
    linears = _projections(layer)
    return all(
        type(p) is torch.nn.Linear and not p.weight.requires_grad and p.weight.dtype == dtype
        for p in linears
    ) and not any(p.bias is not None and p.bias.requires_grad for p in linears)


def _projections(layer) -> list[torch.nn.Linear]:
    attn, mlp = layer.self_attn, layer.mlp
    return [
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    ]


def _concatenated(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for `linears`, whose weights become views into it."""
    weight = torch.cat([p.weight.detach() for p in linears])
    start = 0
    for p in linears:
        rows = p.weight.shape[0]
        p.weight.data = weight[start : start + rows]
        start += rows
    # These configs give biases to all of a group's projections or to none.
    if linears[0].bias is None:
        return weight, None
    return weight, torch.cat([p.bias.detach() for p in linears])


class _FusedLayer:
    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype):
        self.layer, self.dtype = layer, dtype
        self.family = _FAMILIES[type(layer)]
        attn, mlp = layer.self_attn, layer.mlp
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.qkv = _concatenated([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _concatenated([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.out_features
        self.swiglu = mlp.config.hidden_act == "silu"
        self.original = layer.forward
        layer.forward = self.forward

    def restore(self) -> None:
        del self.layer.forward  # the class's forward again

    def active(self, hidden_states: torch.Tensor) -> bool:
        device = hidden_states.device.type
        return (
            torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == self.dtype
            and self.layer.self_attn.q_proj.weight.dtype == self.dtype
        )

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if args or cache is not None or not self.active(hidden_states):
            return self.original(hidden_states, *args, **kwargs)
        layer = self.layer
        attention_mask = kwargs.pop("attention_mask", None)
        cos, sin = kwargs.pop("position_embeddings")
        for unused in ("position_ids", "cache", "past_key_values", "use_cache"):
            kwargs.pop(unused, None)

        residual = hidden_states
        x = _rms_norm(layer.input_layernorm, hidden_states, self.dtype)
        hidden_states = residual + self.attention(x, cos, sin, attention_mask, kwargs)
        residual = hidden_states
        x = _rms_norm(layer.post_attention_layernorm, hidden_states, self.dtype)
        gate_up = F.linear(x, *self.gate_up)
        mlp = layer.mlp
        if self.swiglu:
            hidden = _SwiGLU.apply(gate_up, self.intermediate)
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            hidden = mlp.act_fn(gate) * up
        return residual + mlp.down_proj(hidden)

    def attention(self, x, cos, sin, attention_mask, kwargs):
        attn = self.layer.self_attn
        batch, length = x.shape[:2]
        dim = attn.head_dim
        qkv = F.linear(x, *self.qkv).view(batch, length, self.heads + 2 * self.kv_heads, dim)
        qk, value = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)
        query, key = _Rotary.apply(qk, cos, sin, self.dtype).split(
            [self.heads, self.kv_heads], dim=2
        )
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, self.family.eager
        )
        if self.family.window is not None:
            kwargs = kwargs | {"sliding_window": self.family.window(attn)}
        out, _ = interface(
            attn,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            dropout=0.0 if not attn.training else attn.attention_dropout,
            scaling=attn.scaling,
            **kwargs,
        )
        return attn.o_proj(out.reshape(batch, length, -1).contiguous())


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon, dtype)


class _RMSNorm(torch.autograd.Function):
    """transformers' `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, computed in
    float32 and returned in `dtype` (what the next matmul casts it to)."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.x_dtype = x.dtype
        return (weight * normed).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        grad_normed = grad * weight
        normed = normed.float()
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = (grad_normed - normed * dot).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight, None, None


class _Rotary(torch.autograd.Function):
    """transformers' `x * cos + rotate_half(x) * sin` for (batch, length, heads, dim)
    queries and keys, in float32, rounded once to `dtype`. rotate_half(x) * sin is a
    roll by half the head size times sin with its first half negated."""

    @staticmethod
    def forward(ctx, x, cos, sin, dtype):
        half = x.shape[-1] // 2
        cos = cos.unsqueeze(2)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        x = x.float()
        rotated = x.roll(half, -1).mul_(sin)
        return x.mul_(cos).add_(rotated).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad = grad.to(torch.float32, copy=True)
        grad_x = (grad * sin).roll(half, -1)
        return grad_x.add_(grad.mul_(cos)).to(ctx.x_dtype), None, None, None


class _SwiGLU(torch.autograd.Function):
    """transformers' `silu(gate) * up` over the fused (..., 2 x size) gate/up output, the
    same operations in one node; the gradient is written into one tensor, not
    concatenated from the gate's and the up projection's."""

    @staticmethod
    def forward(ctx, gate_up, size):
        gate, up = gate_up.split(size, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        ctx.size = size
        return activated * up

    @staticmethod
    def backward(ctx, grad):
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.split(ctx.size, dim=-1)
        grad_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        grad_gate, grad_up = grad_gate_up.split(ctx.size, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, activated, out=grad_up)
        return grad_gate_up, None
