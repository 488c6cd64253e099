"""Which layers an adapter wraps, found from the model itself.

The defaults are read off the model's module tree rather than a table per model family:
the attention blocks (modules whose class name says Attention) hold the query / key /
value projections, and the MLP's output projection is the linear layer that maps a wider
activation back to the hidden size. Only the *names* of projections follow conventions
shared across families (q_proj, q, query, c_attn ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ...base_models import LocatedModel, is_encoder_decoder, load_model_config, trust_remote_code
from ...data_model.adapters import AdapterType
from .settings import FIELD, AdapterSettings

# Names attention projections go by across architectures (llama/mistral/qwen, T5,
# BERT-style, GPT-J/NeoX-style ...). Fused query-key-value projections come last.
_ROLES = {
    "query": ("q_proj", "q", "query", "wq", "q_lin"),
    "key": ("k_proj", "k", "key", "wk", "k_lin"),
    "value": ("v_proj", "v", "value", "wv", "v_lin"),
}
_FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "W_pack")


def model_skeleton(located: LocatedModel) -> PreTrainedModel:
    """The model's module tree on the meta device: names and shapes, no weights, no memory,
    so requests can be checked against the architecture before anything is loaded."""
    config = load_model_config(located)
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=trust_remote_code())


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer, None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return tuple(module.weight.shape)
    # Quantized linear layers (bitsandbytes) keep the sizes as attributes.
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return None


def _linear_children(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, tuple]]:
    """(parent name, parent, child name, (in, out)) for every linear layer's direct parent."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            shape = _linear_shape(child)
            if shape is not None:
                yield parent_name, parent, child_name, shape


def _is_attention(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("attn")


def attention_projections(model: torch.nn.Module, roles: tuple[str, ...]) -> list[str]:
    """The names of the attention projections playing `roles` (e.g. query and value),
    or the fused query-key-value projection when the model has no separate ones."""
    names = {child for _, parent, child, _ in _linear_children(model) if _is_attention(parent)}
    found = [next((n for n in _ROLES[role] if n in names), None) for role in roles]
    if all(found):
        return found
    fused = [n for n in _FUSED_QKV if n in names]
    if fused:
        return fused[:1]
    raise ValueError(
        f"could not find the attention {'/'.join(roles)} projections of this "
        f"{model.config.model_type!r} model (its attention layers have linear layers "
        f"{sorted(names)}); set `{FIELD}.target_modules` to the names to adapt."
    )


def mlp_output_projection(model: PreTrainedModel) -> list[str]:
    """The name of the MLP's output (down) projection: the linear layer outside attention
    that maps a wider activation back to the hidden size."""
    hidden = model.config.hidden_size
    by_name: dict[str, set[str]] = {}
    for parent_name, parent, child, (fan_in, fan_out) in _linear_children(model):
        if not _is_attention(parent) and fan_out == hidden and fan_in > hidden:
            by_name.setdefault(child, set()).add(parent_name.rsplit(".", 1)[-1])
    if len(by_name) != 1:
        raise ValueError(
            f"could not find the single MLP output projection of this {model.config.model_type!r} "
            f"model (candidates: {sorted(by_name)}); set `{FIELD}.feedforward_modules` (and "
            "target_modules) to the names to adapt."
        )
    name = next(iter(by_name))
    # GPT-2 calls both attention's and the MLP's output projection c_proj: qualify it
    # with its parent ("mlp.c_proj"), which PEFT matches as a suffix of the full name.
    attention_names = {c for _, parent, c, _ in _linear_children(model) if _is_attention(parent)}
    if name in attention_names:
        name = f"{sorted(by_name[name])[0]}.{name}"
    return [name]


def check_targets(model: torch.nn.Module, names: tuple[str, ...], field: str) -> None:
    """Each name must match a module as PEFT matches it: the full name or its suffix."""
    modules = [name for name, _ in model.named_modules()]
    for target in names:
        if not any(m == target or m.endswith(f".{target}") for m in modules):
            linear = sorted({child for _, _, child, _ in _linear_children(model)})
            raise ValueError(
                f"`{FIELD}.{field}` {target!r} names no module of this "
                f"{model.config.model_type!r} model; its linear layers are {linear}."
            )


def resolve_targets(settings: AdapterSettings, model: PreTrainedModel) -> AdapterSettings:
    """Settings with target_modules (and IA3's feedforward_modules) filled in from the
    model where the request left them unset, and the given ones checked."""
    if settings.adapter_type == AdapterType.IA3:
        feedforward = settings.feedforward_modules or tuple(mlp_output_projection(model))
        # IA3 rescales keys, values and the MLP's inner activations (Liu et al., 2022).
        targets = settings.target_modules or (
            *attention_projections(model, ("key", "value")),
            *feedforward,
        )
        resolved = dataclasses.replace(
            settings, target_modules=tuple(targets), feedforward_modules=tuple(feedforward)
        )
    else:
        targets = settings.target_modules or attention_projections(model, ("query", "value"))
        resolved = dataclasses.replace(settings, target_modules=tuple(targets))
    check_targets(model, resolved.target_modules, "target_modules")
    return resolved
