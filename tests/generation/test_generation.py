"""Generation on a tiny real model: every parameter does what it says."""

import time

import pytest
from caikit.core.data_model import ProducerId
from caikit.interfaces.nlp.data_model import FinishReason
from transformers import AutoModelForCausalLM, AutoTokenizer

from caikit_tuning.generation import GenerationSettings, TextGenerator
from caikit_tuning.generation.decoding import TextAssembler

PROMPT = "the film is"


@pytest.fixture(scope="module")
def generator(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    return TextGenerator(model, AutoTokenizer.from_pretrained(tiny_llama), ProducerId("test", "0"))


def run(generator, **values):
    return generator.generate(PROMPT, GenerationSettings.from_request(**values))


def test_greedy_is_plain_argmax_decoding(generator):
    import torch

    result = run(generator, max_new_tokens=8, min_new_tokens=8)
    ids = generator.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = generator.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = generator.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.generated_text == expected
    assert result.generated_tokens == 8


def test_stop_sequence_is_cut_and_only_matches_generated_text(generator):
    free = run(generator, max_new_tokens=12, min_new_tokens=12).generated_text
    stop = free[3:6]
    assert stop and stop not in free[:3]
    stopped = run(generator, max_new_tokens=12, min_new_tokens=12, stop_sequences=[stop])
    assert stopped.finish_reason == FinishReason.STOP_SEQUENCE
    assert stopped.generated_text == free[: free.index(stop)]
    # A stop sequence that occurs in the prompt only does not stop generation.
    prompt_only = run(generator, max_new_tokens=12, min_new_tokens=12, stop_sequences=["the film"])
    assert "the film" in PROMPT and prompt_only.generated_text == free


def test_streamed_stop_sequence_never_leaks(generator):
    free = run(generator, max_new_tokens=12, min_new_tokens=12).generated_text
    stop = free[4:7]
    settings = GenerationSettings(max_new_tokens=12, min_new_tokens=12, stop_sequences=(stop,))
    chunks = [c.generated_text for c in generator.generate_stream(PROMPT, settings)]
    assert "".join(chunks) == free[: free.index(stop)]


def test_sampling_seed_reproduces_and_differs_from_other_seeds(generator):
    a = run(generator, decoding_method="SAMPLING", seed=1, max_new_tokens=10, min_new_tokens=10)
    b = run(generator, decoding_method="SAMPLING", seed=1, max_new_tokens=10, min_new_tokens=10)
    c = run(generator, decoding_method="SAMPLING", seed=2, max_new_tokens=10, min_new_tokens=10)
    assert a.generated_text == b.generated_text and a.seed == 1
    assert a.generated_text != c.generated_text


def test_top_k_one_sampling_equals_greedy(generator):
    greedy = run(generator, max_new_tokens=8, min_new_tokens=8)
    sampled = run(
        generator, decoding_method="SAMPLING", top_k=1, seed=3, max_new_tokens=8, min_new_tokens=8
    )
    assert sampled.generated_text == greedy.generated_text


def test_eos_finish_and_min_new_tokens(generator):
    # The decay penalty makes EOS the likeliest token once one token exists.
    forced = run(generator, max_new_tokens=20, exponential_decay_length_penalty=(0, 10.0))
    assert forced.finish_reason == FinishReason.EOS_TOKEN
    assert forced.generated_tokens == 2
    held = run(
        generator, max_new_tokens=20, min_new_tokens=5, exponential_decay_length_penalty=(0, 10.0)
    )
    assert held.generated_tokens == 6 and held.finish_reason == FinishReason.EOS_TOKEN


def test_repetition_penalty_changes_output(generator):
    plain = run(generator, max_new_tokens=16, min_new_tokens=16).generated_text
    penalised = run(
        generator, max_new_tokens=16, min_new_tokens=16, repetition_penalty=5.0
    ).generated_text
    assert plain != penalised


def test_max_time_stops_early(generator):
    started = time.monotonic()
    result = run(generator, max_new_tokens=100000 // 1000 * 4, min_new_tokens=400, max_time=0.05)
    assert result.finish_reason == FinishReason.TIME_LIMIT
    assert result.generated_tokens < 400
    assert time.monotonic() - started < 2


def test_truncate_input_tokens_and_preserve_input_text(generator):
    long_prompt = "word " * 40 + PROMPT
    truncated = generator.generate(long_prompt, GenerationSettings(truncate_input_tokens=5))
    assert truncated.input_token_count == 5
    kept = generator.generate(
        PROMPT, GenerationSettings(preserve_input_text=True, max_new_tokens=4)
    )
    alone = generator.generate(PROMPT, GenerationSettings(max_new_tokens=4))
    assert kept.generated_text == PROMPT + alone.generated_text


def test_too_long_input_is_an_error_naming_the_fix(generator):
    with pytest.raises(ValueError, match="truncate_input_tokens"):
        generator.generate("word " * 600, GenerationSettings())


def test_token_details_on_request(generator):
    result = generator.generate(
        PROMPT,
        GenerationSettings(
            max_new_tokens=3,
            min_new_tokens=3,
            include_logprobs=True,
            include_ranks=True,
            include_input_tokens=True,
        ),
    )
    assert len(result.tokens) == 3
    assert all(t.rank == 1 and t.logprob <= 0 for t in result.tokens)  # greedy picks rank 1
    assert len(result.input_tokens) == result.input_token_count


def test_text_assembler_holds_back_possible_stop_prefixes(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("abc def ghi", add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, ("def",))
    released = "".join(assembler.add(i) for i in ids) + assembler.finish()
    assert released == "abc "
    assert assembler.stopped
