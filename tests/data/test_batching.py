import torch
from transformers import AutoTokenizer

from caikit_tuning.data import (
    Example,
    collate_causal,
    collate_seq2seq,
    collect_records,
    length_grouped_batches,
    tokenize_examples,
)


def test_tokenization_masks_source_and_ends_target_with_eos(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    [example] = tokenize_examples(tokenizer, ["good film"], ["positive"], 256, 128)
    source = tokenizer("good film")["input_ids"]
    target = tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert source[0] == tokenizer.bos_token_id
    assert example.source_ids == source
    assert example.target_ids == target + [tokenizer.eos_token_id]


def test_truncation_keeps_the_end_of_the_source_and_bos(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = "one two three four five six seven eight nine ten Sentiment:"
    full = tokenizer(text)["input_ids"]
    [example] = tokenize_examples(tokenizer, [text], ["positive negative positive"], 5, 3)
    assert example.source_ids == [tokenizer.bos_token_id] + full[-4:]
    assert len(example.target_ids) == 3 and example.target_ids[-1] == tokenizer.eos_token_id


def test_causal_collation_against_hand_computed_ids():
    examples = [Example([3, 10, 11], [20, 1]), Example([3, 12], [21, 22, 1])]
    batch = collate_causal(examples, pad_id=0)
    assert batch.input_ids.tolist() == [[3, 10, 11, 20, 1], [3, 12, 21, 22, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # Position p predicts token p + 1: row 0's targets 20, 1 sit at 3, 4 -> positions 2, 3.
    assert batch.target_positions.tolist() == [[2, 3, 0], [1, 2, 3]]
    assert batch.target_ids.tolist() == [[20, 1, -100], [21, 22, 1]]
    assert batch.num_target_tokens == 5
    assert batch.num_real_tokens == 10 and batch.num_padded_tokens == 0


def test_causal_collation_pads_per_batch_not_to_a_fixed_length():
    batch = collate_causal([Example([3, 10], [1]), Example([3], [1])], pad_id=0)
    assert batch.input_ids.tolist() == [[3, 10, 1], [3, 1, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.num_padded_tokens == 1


def test_seq2seq_collation_shifts_targets_right():
    batch = collate_seq2seq([Example([10, 11, 1], [20, 1]), Example([12, 1], [21, 22, 1])], 0, 0)
    assert batch.input_ids.tolist() == [[10, 11, 1], [12, 1, 0]]
    assert batch.decoder_input_ids.tolist() == [[0, 20, 0], [0, 21, 22]]
    assert batch.decoder_attention_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.target_ids.tolist() == [[20, 1, -100], [21, 22, 1]]


def test_length_grouping_covers_every_index_once_and_groups_lengths():
    lengths = [((i * 37) % 100) + 1 for i in range(400)]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = length_grouped_batches(
        lengths, 8, torch.Generator().manual_seed(0), group_by_length=False
    )
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 5


def test_records_missing_output_are_an_error_naming_the_record():
    import pytest

    with pytest.raises(ValueError, match="record 1 has no string `output`"):
        collect_records([{"input": "a", "output": "b"}, {"input": "c"}])
    with pytest.raises(ValueError, match="`train_stream` is empty"):
        collect_records([])
    with pytest.raises(ValueError, match="more than 2 records"):
        collect_records([{"input": "a", "output": "b"}] * 3, max_records=2)
