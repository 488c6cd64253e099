"""Per-optimizer-step work an adapter adds to the shared training loop (AdaLoRA's).

AdaLoRA re-allocates ranks after every optimizer step, reading that step's gradients,
and adds an orthogonality penalty on its singular vectors to the loss. LoRA and IA3
need neither.

The shared loop runs both through `training.fit.fit(..., after_step=, penalty=)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel

from ...base_models import BaseModel
from ...inputs import NO_PREFIX
from ...training import TrainingResult
from ...training.fit import TrainingPlan, fit
from ..evaluation import exact_match_accuracy


@dataclass(frozen=True)
class StepHooks:
    # Called after optimizer.step() and before zero_grad(), with the 1-based step number.
    after_step: Callable[[int], None] | None = None
    # A scalar added to every optimizer step's mean token loss while training.
    penalty: Callable[[], torch.Tensor] | None = None


NO_HOOKS = StepHooks()


def _no_prefix(batch=None):
    """Weight adapters put no soft prompt in front (called with or without a batch)."""
    return NO_PREFIX


def adalora_hooks(peft_model: PeftModel, reallocate: bool) -> StepHooks:
    """AdaLoRA's rank re-allocation (when `reallocate`) and orthogonality penalty."""
    tuner = peft_model.base_model  # peft's AdaLoraModel
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    # lora_A: (r, in) rows and lora_B: (out, r) columns are pushed towards orthonormal.
    factors = [
        (param, "lora_A" in param_name)
        for param_name, param in peft_model.named_parameters()
        if ("lora_A" in param_name or "lora_B" in param_name) and name in param_name
    ]

    def penalty() -> torch.Tensor:
        # AdaLoraModel.forward's term: the mean of ||P P^T - I||_F over the factors.
        norms = []
        for param, is_a in factors:
            gram = param @ param.T if is_a else param.T @ param  # (r, r)
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            norms.append(torch.linalg.matrix_norm(gram - eye))
        return weight * torch.stack(norms).mean()

    return StepHooks(
        after_step=tuner.update_and_allocate if reallocate else None,
        penalty=penalty if weight > 0 and factors else None,
    )


def fit_adapter(
    base: BaseModel,
    plan: TrainingPlan,
    params: list[torch.nn.Parameter],
    records: list[dict],
    val_records: list[dict],
    hooks: StepHooks = NO_HOOKS,
    cast_frozen_weights: bool = True,
) -> TrainingResult:
    """training.fit with the adapter's step hooks (no soft prompt), and validation
    accuracy when the plan asks for it."""
    accuracy = exact_match_accuracy(base, plan, _no_prefix, val_records)
    return fit(
        base,
        plan,
        params,
        _no_prefix,
        records,
        val_records,
        after_step=hooks.after_step,
        penalty=hooks.penalty,
        cast_frozen_weights=cast_frozen_weights,
        **({"accuracy": accuracy} if accuracy else {}),
    )
