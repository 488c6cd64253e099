"""Tiny random models, built offline in seconds, for tests, smoke runs and benchmarks.

The tokenizer is a small byte-level BPE trained on the given texts, so any input
round-trips; the models are real transformers architectures with a few layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]
# A minimal chat template for the causal model, in the <s>role ... </s> style.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
PAD, EOS, UNK, BOS = range(4)


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, add_bos: bool
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; causal models get BOS in front, seq2seq EOS at the end."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        # Without this, token_type_ids appear and break collation.
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_llama(
    folder: Path, texts: Iterable[str], vocab_size: int = 512, hidden: int = 48, seed: int = 0
) -> Path:
    """A 2-layer llama-style causal LM. initializer_range 0.2 makes it learn visibly."""
    tokenizer = build_tokenizer(texts, vocab_size, add_bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_t5(
    folder: Path, texts: Iterable[str], vocab_size: int = 512, hidden: int = 48, seed: int = 0
) -> Path:
    """A 2+2-layer T5-style encoder-decoder model."""
    tokenizer = build_tokenizer(texts, vocab_size, add_bos=False)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=hidden * 2,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        dropout_rate=0.0,
        initializer_factor=1.0,
        tie_word_embeddings=False,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
