"""In-context learning, category outputs, dataset mixes, presets, NEFTune, RoPE
scaling and determinism levels, on tiny models."""

import json

import caikit
import pytest
import torch
from caikit.core.data_model import DataStream
from transformers import BertConfig, BertModel, BertTokenizerFast

from caikit_tuning import InContextLearning, PeftPromptTuning, TextGeneration, TuningConfig
from caikit_tuning.generation.labels import LabelRule
from caikit_tuning.modules.evaluation import evaluate

ROWS = [
    {"input": "a wonderful moving film", "output": "positive"},
    {"input": "a dull lifeless mess", "output": "negative"},
    {"input": "great acting and a fine story", "output": "positive"},
    {"input": "boring and far too long", "output": "negative"},
]


@pytest.fixture(scope="module")
def tiny_bert(base_models_dir, tmp_path_factory):
    """A tiny BERT sentence encoder saved under base_models_dir as "tiny-bert"."""
    folder = base_models_dir / "tiny-bert"
    if not folder.exists():
        vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
        words = sorted({w for r in ROWS for w in r["input"].split()} | {"review", "sentiment", ":"})
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        tokenizer = BertTokenizerFast(vocab_file=str(vocab))
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return "tiny-bert"


def test_zero_shot_prompt_is_description_then_request(base_models_dir):
    model = InContextLearning.train(
        "tiny-llama",
        task_description="Say the sentiment.",
        verbalizer="Review: {{input}}\nSentiment:",
    )
    assert model.model_input("nice") == "Say the sentiment.\n\nReview: nice\nSentiment:"
    assert model.run("nice", max_new_tokens=2).generated_tokens >= 1


def test_random_few_shot_is_stable_per_request(base_models_dir):
    model = InContextLearning.train(
        "tiny-llama",
        DataStream.from_iterable(ROWS * 3),
        verbalizer="Review: {{input}} Sentiment:",
        num_examples=4,
    )
    prompt = model.model_input("a new review")
    assert prompt.count("Sentiment:") == 5 and prompt == model.model_input("a new review")
    assert prompt.endswith("Review: a new review Sentiment:")


def test_semantic_retrieval_puts_the_nearest_example_last(base_models_dir, tiny_bert, tmp_path):
    model = InContextLearning.train(
        "tiny-llama",
        DataStream.from_iterable(ROWS),
        verbalizer="Review: {{input}} Sentiment:",
        num_examples=2,
        retrieval="semantic",
        embedding_model=tiny_bert,
    )
    prompt = model.model_input("boring and far too long")
    examples = prompt.split("\n\n")[:-1]
    assert examples[-1] == "Review: boring and far too long Sentiment: negative"
    model.save(str(tmp_path / "icl"))
    loaded = caikit.load(str(tmp_path / "icl"))
    assert loaded.model_input("boring and far too long") == prompt
    with pytest.raises(ValueError, match="`embedding_model` is required for semantic retrieval"):
        InContextLearning.train(
            "tiny-llama", DataStream.from_iterable(ROWS), num_examples=1, retrieval="semantic"
        )


@pytest.mark.parametrize(
    ("labels", "match", "text", "expected"),
    [
        (["positive", "negative"], "contains", "  it is Negative, not positive", "negative"),
        (["positive", "negative"], "exact", " Positive ", "positive"),
        (["positive", "negative"], "exact", "positive!", "unknown"),
        (["pos=^\\s*(pos|good)", "neg=^\\s*(neg|bad)"], "regex", " good film", "pos"),
        (["positive", "negative"], "contains", "no idea", "unknown"),
    ],
)
def test_label_rules(labels, match, text, expected):
    assert LabelRule.parse(labels, match, "unknown").extract(text) == expected


def test_label_rule_errors():
    with pytest.raises(ValueError, match="label=pattern"):
        LabelRule.parse(["positive"], "regex", None)
    with pytest.raises(ValueError, match="`label_match` must be one of"):
        LabelRule.parse(["a"], "fuzzy", None)
    with pytest.raises(ValueError, match="need `labels`"):
        LabelRule.parse(None, "exact", None)


def test_run_with_labels_and_evaluation_report(base_models_dir):
    model = TextGeneration.bootstrap("tiny-llama")
    raw = model.run("the film is", max_new_tokens=4, min_new_tokens=4).generated_text
    labelled = model.run(
        "the film is",
        max_new_tokens=4,
        min_new_tokens=4,
        labels=["positive", "negative"],
        label_fallback="other",
    )
    assert (
        labelled.generated_text in ("positive", "negative", "other")
        and labelled.generated_tokens == 4
    )
    assert raw != labelled.generated_text or raw in ("positive", "negative")
    report = evaluate(
        model, ROWS, labels=["positive", "negative"], label_fallback="other", max_new_tokens=3
    )
    assert report["records"] == 4 and 0 <= report["accuracy"] <= 1
    assert sum(v["expected"] for v in report["per_label"].values()) == 4
    assert sum(v["predicted"] for v in report["per_label"].values()) == 4


def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_dataset_mixture_concatenates_or_samples_by_weight(base_models_dir, tmp_path):
    a = write(
        tmp_path / "a.jsonl", [{"input": f"a{i}", "output": "x", "task": "a"} for i in range(40)]
    )
    b = write(
        tmp_path / "b.jsonl", [{"input": f"b{i}", "output": "y", "task": "b"} for i in range(10)]
    )
    common = {"tuning_config": TuningConfig(num_virtual_tokens=2), "num_epochs": 1, "batch_size": 8}
    concat = PeftPromptTuning.train(
        "tiny-llama",
        None,
        data={"mixture": [{"file": a}, {"file": b}]},
        tuning_type="MULTITASK_PROMPT_TUNING",
        **common,
    )
    assert concat.training_config["num_records"] == 50
    sampled = PeftPromptTuning.train(
        "tiny-llama",
        None,
        data={
            "mixture": [{"file": a, "weight": 1}, {"file": b, "weight": 3}],
            "mixture_mode": "sample",
            "mixture_size": 40,
            "mixture_seed": 3,
        },
        validation={"split_ratio": 0.25},
        tuning_type="MULTITASK_PROMPT_TUNING",
        **common,
    )
    assert sampled.training_config["num_records"] == 30  # 40 drawn, a quarter held out
    assert sampled.tasks == ["a", "b"]
    with pytest.raises(ValueError, match="not both"):
        PeftPromptTuning.train(
            "tiny-llama", DataStream.from_iterable(ROWS), data={"mixture": [{"file": a}]}, **common
        )
    with pytest.raises(ValueError, match="no such file"):
        PeftPromptTuning.train(
            "tiny-llama", None, data={"mixture": [{"file": str(tmp_path / "none.jsonl")}]}, **common
        )


def test_presets_fill_unset_knobs_and_are_recorded(base_models_dir):
    rows = DataStream.from_iterable(ROWS * 2)
    model = PeftPromptTuning.train(
        "tiny-llama",
        rows,
        TuningConfig(num_virtual_tokens=2),
        preset="classification",
        num_epochs=1,
    )
    config = model.training_config
    assert (
        config["preset"] == "classification"
        and config["learning_rate"] == 0.03
        and config["num_epochs"] == 1
    )
    plain = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(ROWS),
        TuningConfig(num_virtual_tokens=2),
        num_epochs=1,
    )
    assert plain.training_config["learning_rate"] == 0.3 and plain.training_config["preset"] is None
    with pytest.raises(ValueError, match="`preset` must be one of"):
        PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(ROWS),
            TuningConfig(num_virtual_tokens=2),
            preset="poetry",
        )


def test_neftune_noise_changes_training_only(base_models_dir):
    common = {"num_epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "torch_dtype": "float32"}
    plain = TextGeneration.train("tiny-llama", DataStream.from_iterable(ROWS), **common)
    noisy = TextGeneration.train(
        "tiny-llama", DataStream.from_iterable(ROWS), neftune_noise_alpha=5.0, **common
    )
    assert not torch.equal(plain.base.model.lm_head.weight, noisy.base.model.lm_head.weight)
    assert noisy.training_config["neftune_noise_alpha"] == 5.0
    # Generation uses no noise: two runs agree.
    assert (
        noisy.run("a film", max_new_tokens=5).generated_text
        == noisy.run("a film", max_new_tokens=5).generated_text
    )


def test_rope_scaling_is_applied_recorded_and_reloaded(base_models_dir, tmp_path):
    rope = {"type": "linear", "factor": 2.0}
    model = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(ROWS),
        TuningConfig(num_virtual_tokens=2),
        num_epochs=1,
        rope_scaling=rope,
    )
    assert model.base.model.config.rope_parameters["rope_type"] == "linear"
    assert model.base.model.config.rope_parameters["factor"] == 2.0
    expected = model.run("a fine film", max_new_tokens=6, min_new_tokens=6).generated_text
    model.save(str(tmp_path / "roped"))
    loaded = PeftPromptTuning.load(str(tmp_path / "roped"))
    assert loaded.base.model.config.rope_parameters["factor"] == 2.0
    assert loaded.run("a fine film", max_new_tokens=6, min_new_tokens=6).generated_text == expected
    with pytest.raises(ValueError, match="has none"):
        PeftPromptTuning.train(
            "tiny-t5",
            DataStream.from_iterable(ROWS),
            TuningConfig(num_virtual_tokens=2),
            rope_scaling=rope,
        )
    with pytest.raises(ValueError, match="`rope_scaling.factor` must be a number > 1"):
        PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(ROWS),
            TuningConfig(num_virtual_tokens=2),
            rope_scaling={"type": "linear", "factor": 0.5},
        )


def test_determinism_levels(base_models_dir):
    from caikit_tuning.training.progress import progress_sink

    seen = []
    with progress_sink(lambda entry: seen.append(torch.are_deterministic_algorithms_enabled())):
        first = PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(ROWS),
            TuningConfig(num_virtual_tokens=2),
            num_epochs=1,
            batch_size=2,
            determinism="full",
        )
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    second = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(ROWS),
        TuningConfig(num_virtual_tokens=2),
        num_epochs=1,
        batch_size=2,
        determinism="full",
    )
    assert torch.equal(first.prompt.weight, second.prompt.weight)
    with pytest.raises(ValueError, match="`determinism` must be one of"):
        PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(ROWS),
            TuningConfig(num_virtual_tokens=2),
            determinism="maybe",
        )
