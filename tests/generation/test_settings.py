import pytest

from caikit_tuning.data_model import DecodingMethod
from caikit_tuning.generation import GenerationSettings


def test_defaults_and_request_nones():
    settings = GenerationSettings.from_request(max_new_tokens=None, top_k=None)
    assert settings.max_new_tokens == 20
    assert settings.decoding_method == DecodingMethod.GREEDY


def test_decoding_method_accepts_names_and_enums():
    assert GenerationSettings(decoding_method="sampling").decoding_method == DecodingMethod.SAMPLING
    assert (
        GenerationSettings(decoding_method=DecodingMethod.GREEDY).decoding_method
        == DecodingMethod.GREEDY
    )


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"max_new_tokens": 0}, ValueError, "`max_new_tokens` must be >= 1"),
        ({"max_new_tokens": "5"}, TypeError, "`max_new_tokens` must be an integer"),
        ({"min_new_tokens": 30, "max_new_tokens": 10}, ValueError, "must not exceed"),
        (
            {"decoding_method": "SAMPLING", "top_p": -0.5},
            ValueError,
            r"`top_p` must be in \(0, 1\]",
        ),
        ({"decoding_method": "SAMPLING", "top_p": 1.5}, ValueError, r"`top_p` must be in \(0, 1\]"),
        ({"decoding_method": "SAMPLING", "typical_p": -1}, ValueError, "`typical_p`"),
        (
            {"decoding_method": "SAMPLING", "temperature": 1e-4},
            ValueError,
            r"`temperature` must be in \[0.001, 1000\]",
        ),
        (
            {"decoding_method": "BEAM"},
            ValueError,
            r"`decoding_method` must be one of \['GREEDY', 'SAMPLING'\]",
        ),
        (
            {"repetition_penalty": 1e-3},
            ValueError,
            r"`repetition_penalty` must be in \[0.01, 100\]",
        ),
        ({"max_time": -1.0}, ValueError, "`max_time` must be > 0"),
        # Straight GenerationSettings(...) stays strict about GREEDY + sampling knobs.
        ({"stop_sequences": "stop"}, TypeError, "list of strings"),
        ({"stop_sequences": [""]}, ValueError, "non-empty strings"),
        ({"truncate_input_tokens": -1}, ValueError, "`truncate_input_tokens` must be >= 0"),
        (
            {"exponential_decay_length_penalty": (5, 1e308)},
            ValueError,
            r"decay_factor` must be in \[0.001, 10\]",
        ),
        # Numerically unsafe values are refused at the boundary, naming the field.
        ({"decoding_method": "SAMPLING", "temperature": 1e-300}, ValueError, "`temperature`"),
        ({"decoding_method": "SAMPLING", "temperature": float("nan")}, ValueError, "finite"),
        ({"repetition_penalty": 1e-300}, ValueError, "`repetition_penalty` must be in"),
        ({"repetition_penalty": float("inf")}, ValueError, "`repetition_penalty` must be a finite"),
        ({"exponential_decay_length_penalty": (0, float("inf"))}, ValueError, "decay_factor"),
        ({"max_time": float("nan")}, ValueError, "`max_time` must be a finite"),
        ({"decoding_method": "SAMPLING", "seed": 2**64}, ValueError, "`seed` must be <= "),
        (
            {"max_new_tokens": 10**30},
            ValueError,
            r"`max_new_tokens` must be <= 2147483647, got 1000",
        ),
        ({"num_beams": 4096}, ValueError, r"`num_beams` may be at most 8"),
        ({"stop_sequences": ["x" * 300]}, ValueError, "at most 256 characters"),
        ({"exponential_decay_length_penalty": 5}, ValueError, r"\(start_index, decay_factor\)"),
        ({"bogus": 1}, ValueError, r"unknown generation parameter\(s\) \['bogus'\]"),
    ],
)
def test_invalid_values_name_the_field(values, error, message):
    with pytest.raises(error, match=message):
        GenerationSettings.from_request(**values)


def test_requests_read_as_caikit_nlp_clients_mean_them():
    """caikit-nlp / TGIS clients send one parameter set: sampling knobs beside GREEDY
    and proto3 zeros for unset. Both are accepted and ignored, as caikit-nlp does."""
    greedy = GenerationSettings.from_request(
        decoding_method="GREEDY", top_k=3, top_p=0.5, typical_p=0.5, temperature=0.01, seed=7
    )
    assert greedy == GenerationSettings()
    zeros = GenerationSettings.from_request(
        decoding_method="SAMPLING", repetition_penalty=0.0, top_p=0.0, temperature=0.0, top_k=0
    )
    assert zeros == GenerationSettings(decoding_method="SAMPLING")
    with pytest.raises(ValueError, match="only apply to decoding_method SAMPLING"):
        GenerationSettings(top_k=5)


def test_openai_penalties_lower_the_scores_of_generated_tokens():
    import torch

    from caikit_tuning.generation.decoding import OccurrencePenalty, TokenChooser

    scores = torch.zeros(1, 6)
    prompt_and_generated = torch.tensor([[3, 3, 1, 1, 1, 4]])  # prompt [3, 3], then 1, 1, 1, 4
    penalized = OccurrencePenalty(2, presence=0.5, frequency=0.25)(prompt_and_generated, scores)
    # Token 1: once present (0.5) + three times (0.75); token 4: 0.5 + 0.25; token 3 only
    # in the prompt.
    assert penalized[0].tolist() == [0.0, -1.25, 0.0, 0.0, -0.75, 0.0]

    settings = GenerationSettings(frequency_penalty=2.0, top_logprobs=3, include_logprobs=True)
    chooser = TokenChooser(settings, prompt_ids=[0], eos_ids=[], seed=0)
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    assert chooser.choose(logits, [0]).token == 1
    choice = chooser.choose(logits, [0, 1, 1])  # 1 was generated twice: 3 - 4 < 2
    assert choice.token == 2
    # Log-probabilities are the model's own, before penalties, best first.
    assert [token for token, _ in choice.top] == [1, 2, 3]
    assert choice.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[2]))
    with pytest.raises(ValueError, match="presence_penalty"):
        GenerationSettings(presence_penalty=2.5)
