"""What a model is fed: token embeddings with learned soft-prompt vectors in front,
shared by the training loss and every way of generating."""

from .prefix import NO_PREFIX, PromptPrefix, accepts_logits_to_keep, embed_with_prefix

__all__ = ["NO_PREFIX", "PromptPrefix", "accepts_logits_to_keep", "embed_with_prefix"]
