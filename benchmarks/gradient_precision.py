"""How far bf16 autocast moves a soft prompt's gradient, next to how far the batch does.

For one prompt (the RANDOM init of `PeftPromptTuning`, and the same after a few
training steps), the gradient of the mean target loss over a batch of 8 bundled reviews
is computed in float32 and under CPU bf16 autocast, the latter through transformers'
layers and through the project's training path for frozen layers (weights cast once,
`training/fused_layers.py`). Reported: the cosine between each and float32, the relative
error of each,
and, for scale, the cosine between the float32 gradients of two different batches
(the noise that stochastic training lives with anyway). Adam's first steps move each
coordinate by about the learning rate in the direction of the gradient's sign, so the
share of coordinates whose sign differs is reported as well.

    python benchmarks/gradient_precision.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_quality import SETS, read_rows  # noqa: E402
from train_throughput import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def batch_tensors(tokenizer, verbalizer: str, rows: list[dict]):
    """Right-padded (input_ids, attention_mask, labels) with loss on the targets only."""
    import torch

    ids, labels = [], []
    for row in rows:
        source = tokenizer(verbalizer.replace("{{input}}", row["input"]))["input_ids"]
        target = tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        ids.append(source + target)
        labels.append([-100] * len(source) + target)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return input_ids, mask, label_ids


def prompt_gradient(model, prompt, base_embeds, batch, bf16: bool):
    """d(mean target loss)/d(prompt) with the frozen model in float32 or under autocast."""
    import contextlib

    import torch
    import torch.nn.functional as F

    input_ids, mask, labels = batch
    prompt = prompt.detach().clone().requires_grad_(True)
    n = prompt.shape[0]
    embeds = torch.cat([prompt.expand(len(input_ids), -1, -1), base_embeds(input_ids)], dim=1)
    full_mask = torch.cat([torch.ones(len(input_ids), n, dtype=mask.dtype), mask], dim=1)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        logits = model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits
    logits = logits[:, n:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )
    loss.backward()
    return prompt.grad.flatten()


def compare(model, prompt, batches) -> dict:
    import torch
    import torch.nn.functional as F

    from caikit_tuning.training.fused_layers import fused_decoder_layers
    from caikit_tuning.training.precision import FrozenWeightCast

    embeds = model.get_input_embeddings()
    g32 = [prompt_gradient(model, prompt, embeds, b, bf16=False) for b in batches]
    g16 = prompt_gradient(model, prompt, embeds, batches[0], bf16=True)
    with (
        FrozenWeightCast(model, torch.bfloat16) as cast,
        fused_decoder_layers(model, cast.dtype) as fused,
    ):
        assert fused, "no layer ran fused"
        g16_fused = prompt_gradient(model, prompt, embeds, batches[0], bf16=True)

    def error(g):
        return round(((g - g32[0]).norm() / g32[0].norm()).item(), 4)

    return {
        "cos_bf16_vs_fp32_same_batch": round(F.cosine_similarity(g16, g32[0], dim=0).item(), 4),
        "cos_fused_bf16_vs_fp32_same_batch": round(
            F.cosine_similarity(g16_fused, g32[0], dim=0).item(), 4
        ),
        "relative_error_bf16": error(g16),
        "relative_error_fused_bf16": error(g16_fused),
        "cos_fp32_batch_vs_other_batch": round(
            F.cosine_similarity(g32[1], g32[0], dim=0).item(), 4
        ),
        "sign_differs_bf16_vs_fp32": round((g16.sign() != g32[0].sign()).float().mean().item(), 4),
        "sign_differs_fused_bf16_vs_fp32": round(
            (g16_fused.sign() != g32[0].sign()).float().mean().item(), 4
        ),
        "sign_differs_other_batch": round(
            (g32[1].sign() != g32[0].sign()).float().mean().item(), 4
        ),
        "norm_ratio_bf16_over_fp32": round((g16.norm() / g32[0].norm()).item(), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--set", default="rt_sentiment", choices=list(SETS))
    parser.add_argument(
        "--steps", type=int, default=10, help="float32 Adam steps before the second look"
    )
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()

    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        _, folder = resolve_model(args.model, Path(workdir))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    verbalizer = SETS[args.set][0]
    rows = read_rows(f"{args.set}_train.jsonl")
    batches = [
        batch_tensors(tokenizer, verbalizer, rows[i : i + 8])
        for i in range(0, 8 * (args.steps + 2), 8)
    ]
    std = model.get_input_embeddings().weight.std().item()
    prompt = torch.randn(20, model.config.hidden_size) * std  # the project's RANDOM init
    report = {
        "model": args.model,
        "set": args.set,
        "at_init": compare(model, prompt, batches[:2]),
    }
    # A few Adam steps (lr 0.03, float32), then the same comparison on fresh batches.
    weight = torch.nn.Parameter(prompt.clone())
    optimizer = torch.optim.AdamW([weight], lr=0.03, weight_decay=0.0)
    embeds = model.get_input_embeddings()
    for batch in batches[2:]:
        weight.grad = prompt_gradient(model, weight, embeds, batch, bf16=False).view_as(weight)
        optimizer.step()
    report[f"after_{args.steps}_steps"] = compare(model, weight.detach(), batches[:2])
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gradient_precision_{args.set}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
