"""Which training records become a request's few-shot examples: random or semantic."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoModel, AutoTokenizer

from ...base_models import LocatedModel, trust_remote_code

RETRIEVALS = ("random", "semantic")


class Embedder:
    """Sentence embeddings: mean of the encoder's token states, L2-normalised."""

    def __init__(self, located: LocatedModel):
        self.tokenizer = AutoTokenizer.from_pretrained(
            located.location, local_files_only=located.local, trust_remote_code=trust_remote_code()
        )
        self.model = AutoModel.from_pretrained(
            located.location,
            local_files_only=located.local,
            use_safetensors=True,
            trust_remote_code=trust_remote_code(),
        ).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            states = self.model(**encoded).last_hidden_state  # (batch, seq, hidden)
            mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(rows) if rows else torch.empty(0, 0)


def random_examples(text: str, pool_size: int, k: int, seed: int) -> list[int]:
    """k record indices, drawn per request: the same text always gets the same examples."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
    return torch.randperm(pool_size, generator=generator)[: min(k, pool_size)].tolist()


def nearest_examples(query: torch.Tensor, pool: torch.Tensor, k: int) -> list[int]:
    """Indices of the k pool rows most similar to `query` (both normalised), nearest last,
    so the closest example sits right before the question."""
    scores = pool @ query  # (pool,)
    best = torch.topk(scores, min(k, pool.shape[0])).indices.tolist()
    return best[::-1]
