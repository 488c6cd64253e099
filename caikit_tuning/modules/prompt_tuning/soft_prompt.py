"""The soft prompt: learned input vectors, their initialisation and their PEFT file format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...data_model import PromptOutputModelType, PromptTuningInitMethod
from ...inputs.prefix import PromptPrefix
from .settings import PromptTuningSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The tensor name PEFT uses for prompt-tuning weights.
_WEIGHTS_KEY = "prompt_embeddings"


class SoftPrompt(torch.nn.Module):
    """`num_virtual_tokens` vectors per placement, stored as one (rows, hidden) tensor
    with the encoder's rows first, as PEFT stores two-stack prompts."""

    def __init__(self, weight: torch.Tensor, placements: tuple[PromptOutputModelType, ...]):
        super().__init__()
        if weight.shape[0] % len(placements):
            raise ValueError(
                f"prompt has {weight.shape[0]} rows, not a multiple of {len(placements)} placements."
            )
        self.weight = torch.nn.Parameter(weight.float())  # (rows, hidden), kept in float32
        self.placements = placements
        self.num_virtual_tokens = weight.shape[0] // len(placements)

    def prefix(self) -> PromptPrefix:
        parts = dict(zip(self.placements, self.weight.split(self.num_virtual_tokens), strict=True))
        return PromptPrefix(
            encoder=parts.get(PromptOutputModelType.ENCODER),
            decoder=parts.get(PromptOutputModelType.DECODER),
        )


# LABELS init fills the virtual tokens the labels leave from the first (for byte-pair
# vocabularies, the most frequent) tokens of the vocabulary, as Lester et al. (2021)
# sampled from the 5,000 most common ones.
COMMON_TOKENS = 5000


def initial_weight(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: PromptTuningSettings,
    generator: torch.Generator,
    outputs: list[str] = (),
) -> torch.Tensor:
    """The starting prompt, (num_virtual_tokens * placements, hidden), float32 on CPU.
    `outputs`: the training records' outputs (LABELS init)."""
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()  # (vocab, hidden)
    count = settings.num_virtual_tokens
    if settings.init_method == PromptTuningInitMethod.LABELS:
        ids = label_token_ids(tokenizer, outputs)[:count]
        common = min(COMMON_TOKENS, embeddings.shape[0])
        fill = torch.randint(0, common, (count - len(ids),), generator=generator).tolist()
        one = embeddings[torch.tensor(ids + fill, dtype=torch.long)]
    elif settings.init_method == PromptTuningInitMethod.TEXT:
        ids = tokenizer(settings.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("`tuning_config.prompt_tuning_init_text` tokenizes to nothing.")
        # Repeat the text's tokens to fill every virtual token, as PEFT does.
        ids = (ids * (count // len(ids) + 1))[:count]
        one = embeddings[torch.tensor(ids)]
    else:
        # Random vectors at the scale of the model's own token embeddings: a unit-normal
        # prompt would dwarf the real tokens next to it.
        std = embeddings.std().item()
        one = torch.randn(count, embeddings.shape[1], generator=generator) * std
    return one.repeat(len(settings.placements), 1).clone()


def label_token_ids(tokenizer: PreTrainedTokenizerBase, outputs: list[str]) -> list[int]:
    """The distinct tokens of the outputs (as they follow a space, where a verbalizer puts
    them), the most frequent outputs first."""
    counts: dict[str, int] = {}
    for output in outputs:
        label = output.strip()
        if label:
            counts[label] = counts.get(label, 0) + 1
    ids: list[int] = []
    for label in sorted(counts, key=lambda label: -counts[label]):
        for token in tokenizer(" " + label, add_special_tokens=False)["input_ids"]:
            if token not in ids:
                ids.append(token)
    if not ids:
        raise ValueError(
            "`tuning_config.prompt_tuning_init_method` LABELS needs records with non-empty outputs."
        )
    return ids


def save_adapter(
    folder: Path,
    prompt: SoftPrompt,
    is_encoder_decoder: bool,
    base_model_name_or_path: str,
) -> None:
    """Write the prompt as a standard PEFT prompt-tuning adapter."""
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
        num_virtual_tokens=prompt.num_virtual_tokens,
        token_dim=prompt.weight.shape[1],
        num_transformer_submodules=len(prompt.placements),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    save_file(
        {_WEIGHTS_KEY: prompt.weight.detach().cpu().contiguous()}, str(folder / ADAPTER_WEIGHTS)
    )


def load_adapter(folder: Path, placements: tuple[PromptOutputModelType, ...]) -> SoftPrompt:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(
            f"{folder.name}/{ADAPTER_CONFIG} is not a prompt-tuning adapter: {config.get('peft_type')!r}."
        )
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    if _WEIGHTS_KEY not in tensors:
        raise ValueError(f"{folder.name}/{ADAPTER_WEIGHTS} holds no `{_WEIGHTS_KEY}` tensor.")
    prompt = SoftPrompt(tensors[_WEIGHTS_KEY], placements)
    if config.get("num_virtual_tokens") not in (None, prompt.num_virtual_tokens):
        raise ValueError(
            f"{folder.name}/{ADAPTER_CONFIG} says {config['num_virtual_tokens']} virtual "
            f"tokens but its weights hold {prompt.num_virtual_tokens}."
        )
    return prompt


def export_tgis(folder: Path, prompt: SoftPrompt) -> None:
    """Also write the prompt vectors as TGIS reads them: decoder.pt / encoder.pt, each a
    (num_virtual_tokens, hidden) tensor."""
    prefix = prompt.prefix()
    for name, vectors in (("encoder", prefix.encoder), ("decoder", prefix.decoder)):
        if vectors is not None:
            torch.save(vectors.detach().cpu().clone(), folder / f"{name}.pt")
