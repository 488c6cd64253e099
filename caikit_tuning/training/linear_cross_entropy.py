"""The LM head and the cross-entropy of the targets in one pass, a chunk at a time.

Projecting every target position onto the vocabulary at once keeps (targets x vocab)
logits, a float32 copy, its log-softmax and, in the backward, a float32 gradient of the
same size: for a batch of 8 answers of 150 tokens and SmolLM2's 49,152-word vocabulary,
about 0.9 GB, most of it written and read once. Here each chunk of positions is
projected, reduced to its loss and turned at once into its gradient (softmax minus
one-hot, times the head), so one chunk of logits lives at a time and the backward has
no vocabulary-sized work left. The arithmetic is the unfused path's: the same matmul
dtype (the autocast dtype, else the weight's), logits rounded to it, then float32.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

# Architectures whose logits are exactly `lm_head(final hidden state)`: no soft-capping,
# no logit scale, no bias. Others keep the model's own forward.
PLAIN_HEADS = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2"}
)


def rows_per_chunk(vocab: int) -> int:
    """Positions per chunk: about 32 MB of float32 logits whatever the vocabulary."""
    return max(16, 2**23 // vocab)


def fused_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, LM head) of a causal LM whose loss can be fused, else None."""
    if hasattr(model, "get_base_model"):  # a PeftModel (LoRA): layers are patched in place
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in PLAIN_HEADS:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None  # a quantized or adapted head computes its own way
    return model.get_decoder(), head


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """sum over i of cross_entropy(hidden[i] @ weight.T, targets[i]), -100 ignored.

    hidden: (n, hidden); weight: (vocab, hidden); targets: (n,). Returns a float32 scalar."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = min(rows_per_chunk(weight.shape[0]), max(1, hidden.shape[0]))
        w = weight.to(dtype)
        h = hidden.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        # One chunk's logits in the matmul dtype and in float32, reused by every chunk and
        # updated in place: on CPU a fresh allocation of this size for each operation
        # costs page faults every time (measured: 13 ms for a 32 MB subtraction, 1.6 ms
        # for 24 MB).
        low = torch.empty(rows, w.shape[0], dtype=dtype, device=hidden.device)
        scores = torch.empty_like(low, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, h.shape[0], rows):
                chunk = slice(start, start + rows)
                n = len(h[chunk])
                # The logits rounded to the matmul dtype, then float32.
                s = scores[:n].copy_(torch.mm(h[chunk], w.T, out=low[:n]))
                target = targets[chunk]
                valid = target != -100
                picked = target.clamp(min=0)
                true_logit = s.gather(1, picked[:, None])[:, 0]
                peak = s.amax(dim=-1, keepdim=True)
                total = s.sub_(peak).exp_().sum(dim=-1)  # s is now exp(logits - peak)
                log_norm = peak[:, 0] + total.log()
                loss += torch.where(valid, log_norm - true_logit, 0.0).sum()
                if not (want_hidden or want_weight):
                    continue
                # d loss / d logits = softmax - one-hot, zero for ignored positions.
                s.mul_((valid / total)[:, None])
                s[torch.arange(n, device=s.device), picked] -= valid.float()
                grad = low[:n].copy_(s)
                if want_hidden:
                    grad_hidden[chunk] = grad @ w
                if want_weight:
                    grad_weight += (grad.T @ h[chunk]).float()
        ctx.save_for_backward(
            grad_hidden if want_hidden else None, grad_weight if want_weight else None
        )
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss if grad_hidden is not None else None,
            (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )
