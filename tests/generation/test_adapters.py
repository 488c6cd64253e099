"""Weight adapters on a shared base model: one base for every model, adapters mixed with
soft prompts in one continuous batch, attached on demand and detached under limits."""

import gc
import shutil
import threading

import pytest
import torch
from caikit.core.data_model import DataStream
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from caikit_tuning import (
    PeftPromptTuning,
    TextGeneration,
    TrainGenerationRecord,
    TuningConfig,
)
from caikit_tuning.generation.adapters import AdaptedLinear, AdapterLimits, LayerAdapter, routed
from caikit_tuning.generation.batching import engine_for
from caikit_tuning.modules.lora import LoraTuning

TEXT = "a wonderful moving film"
VERBALIZER = "Review: {{input}} Sentiment:"
VARIANTS = {
    "lora": {"adapter_type": "LORA"},
    "rslora": {"adapter_type": "LORA", "use_rslora": True},
    "dora": {"adapter_type": "LORA", "use_dora": True},
    "ia3": {"adapter_type": "IA3"},
}


def records(label: str, n: int = 8) -> list[TrainGenerationRecord]:
    return [TrainGenerationRecord(input=f"{TEXT} {i}", output=label) for i in range(n)]


def train_lora(base: str, variant: str, label: str, seed: int) -> LoraTuning:
    rate = 3e-1 if variant == "ia3" else 3e-2
    return LoraTuning.train(
        base,
        DataStream.from_iterable(records(label)),
        verbalizer=VERBALIZER,
        adapter_config=VARIANTS[variant],
        num_epochs=2,
        batch_size=4,
        learning_rate=rate,
        seed=seed,
    )


def train_prompt(base: str, label: str, seed: int) -> PeftPromptTuning:
    return PeftPromptTuning.train(
        base,
        DataStream.from_iterable(records(label)),
        TuningConfig(num_virtual_tokens=3 + seed),
        verbalizer=VERBALIZER,
        num_epochs=2,
        seed=seed,
    )


@pytest.fixture(scope="module")
def saved(base_models_dir, tmp_path_factory):
    """Saved models on tiny-llama and tiny-t5: name -> folder."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    jobs = [
        *(
            (f"llama-{v}", lambda v=v, s=s: train_lora("tiny-llama", v, "positive", s))
            for s, v in enumerate(VARIANTS)
        ),
        ("llama-lora-b", lambda: train_lora("tiny-llama", "lora", "negative", 7)),
        ("llama-prompt", lambda: train_prompt("tiny-llama", "negative", 1)),
        ("t5-lora", lambda: train_lora("tiny-t5", "lora", "positive", 1)),
        ("t5-lora-b", lambda: train_lora("tiny-t5", "lora", "negative", 2)),
        ("t5-prompt", lambda: train_prompt("tiny-t5", "negative", 2)),
    ]
    for name, train in jobs:
        train().save(str(root / name))
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def loaded(saved):
    """Every saved model loaded once (as the runtime loads them), and each base served
    as it is: name -> model."""
    models = {name: _load(folder) for name, folder in saved.items()}
    models["llama-base"] = TextGeneration.bootstrap("tiny-llama")
    models["t5-base"] = TextGeneration.bootstrap("tiny-t5")
    return models


def _load(folder):
    return (LoraTuning if "prompt" not in folder.name else PeftPromptTuning).load(str(folder))


def greedy(model, text=TEXT, n=8) -> str:
    return model.run(text, max_new_tokens=n, min_new_tokens=n).generated_text


def together(calls):
    """Run the calls at the same time, each in its own thread; their results in order."""
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def work(index, call):
        start.wait()
        results[index] = call()

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@torch.no_grad()
def next_logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")
    if model.config.is_encoder_decoder:
        start = torch.tensor([[model.config.decoder_start_token_id]])
        return model(**ids, decoder_input_ids=start).logits[0, -1]
    return model(**ids).logits[0, -1]


def test_every_model_on_a_base_shares_its_one_loaded_copy(loaded):
    for family in ("llama", "t5"):
        models = [m for name, m in loaded.items() if name.startswith(family)]
        assert len({id(m.base.model) for m in models}) == 1, family
        for model in models:
            assert model.public_model_info["shares_base"] is True
    kinds = {name: m.public_model_info["kind"] for name, m in loaded.items()}
    assert kinds["llama-dora"] == "dora" and kinds["llama-ia3"] == "ia3"
    assert kinds["llama-prompt"] == "prompt" and kinds["llama-base"] == "base"
    assert loaded["t5-lora"].public_model_info["base_model"] == "tiny-t5"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_adapter_computes_what_peft_computes(variant, loaded, saved, tiny_llama):
    model = loaded[f"llama-{variant}"]
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(saved[f"llama-{variant}"] / "adapter")
    ).eval()
    text = model.model_input(TEXT)
    expected = next_logits(reference, model.base.tokenizer, text)
    with model.adapted() as adapted:
        ours = next_logits(adapted, model.base.tokenizer, text)
    base = next_logits(model.base.model, model.base.tokenizer, text)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_seq2seq_shared_adapter_computes_what_peft_computes(loaded, saved, tiny_t5):
    model = loaded["t5-lora"]
    reference = PeftModel.from_pretrained(
        AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), str(saved["t5-lora"] / "adapter")
    ).eval()
    text = model.model_input(TEXT)
    with model.adapted() as adapted:
        ours = next_logits(adapted, model.base.tokenizer, text)
    torch.testing.assert_close(ours, next_logits(reference, model.base.tokenizer, text))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_mixed_batch_rows_equal_each_model_run_alone(family, loaded):
    """Base, prompt and adapter requests decode in one batch; every row's greedy output
    is the one its model gives alone."""
    models = [m for name, m in loaded.items() if name.startswith(family)]
    texts = [TEXT, "a dull lifeless mess", "it was a dark night and", "why"]
    calls = [(m, t) for m in models for t in texts[: 2 if family == "llama" else 4]]
    alone = [greedy(m, t) for m, t in calls]
    engine = engine_for(models[0].base.model)
    assert engine is not None, "the model family is batched"
    before = engine.max_rows_seen
    engine.max_rows_seen = 0
    batched = together([lambda m=m, t=t: greedy(m, t) for m, t in calls])
    assert engine.max_rows_seen > 1, "requests shared a batch"
    engine.max_rows_seen = max(before, engine.max_rows_seen)
    assert batched == alone
    # The adapters are not no-ops: the models answer differently.
    assert len({greedy(m) for m in models}) > 2


def test_adapters_detach_least_recently_used_and_reattach_on_demand(loaded):
    host = loaded["llama-lora"].shared.host
    first = {name: greedy(loaded[name]) for name in ("llama-lora", "llama-lora-b", "llama-dora")}
    limits = host.limits
    host.limits = AdapterLimits(max_adapters=2, max_bytes=limits.max_bytes)
    try:
        attached = host.attached_count
        for name in ("llama-lora", "llama-lora-b", "llama-dora", "llama-lora"):
            assert greedy(loaded[name]) == first[name]
            assert len(host.attached) <= 2
        keys = {loaded[n].shared.key for n in ("llama-dora", "llama-lora")}
        assert set(host.attached) == keys  # the two used last
        assert host.attached_count > attached  # evicted adapters were read again
        # A byte budget below two adapters keeps one.
        host.limits = AdapterLimits(max_adapters=8, max_bytes=host.nbytes // 2 + 1)
        assert greedy(loaded["llama-lora-b"]) == first["llama-lora-b"]
        assert host.attached == [loaded["llama-lora-b"].shared.key]
    finally:
        host.limits = limits


def test_an_adapter_in_use_is_never_detached(loaded):
    host = loaded["llama-lora"].shared.host
    limits = host.limits
    host.limits = AdapterLimits(max_adapters=1, max_bytes=limits.max_bytes)
    try:
        expected = {n: greedy(loaded[n], n=24) for n in ("llama-lora", "llama-lora-b")}
        outputs = together(
            [lambda n=n: greedy(loaded[n], n=24) for n in ("llama-lora", "llama-lora-b")] * 2
        )
        assert outputs == [expected["llama-lora"], expected["llama-lora-b"]] * 2
    finally:
        host.limits = limits


def test_replacing_a_model_finishes_its_requests_on_the_old_weights(saved, loaded, tmp_path):
    """A retrained model swapped in while the old one streams: the old request ends on
    the old adapter, new requests get the new one, and the old adapter is then freed."""
    old = _load(saved["llama-lora"])
    host = old.shared.host
    old_key = old.shared.key
    expected_old = greedy(loaded["llama-lora"], n=32)
    stream = old.run_stream_out(TEXT, max_new_tokens=32, min_new_tokens=32)
    first = next(stream)
    new = _load(saved["llama-lora-b"])
    del old
    gc.collect()
    assert old_key in host.attached  # its request is still running
    rest = "".join(part.generated_text for part in stream)
    assert first.generated_text + rest == expected_old
    assert old_key not in host.attached
    assert greedy(new) == greedy(loaded["llama-lora-b"])


def test_an_adapter_file_changed_on_disk_is_not_read_as_the_old_model(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved["llama-lora"], folder)
    model = _load(folder)
    host = model.shared.host
    host.detach(model.shared.key)
    weights = folder / "adapter" / "adapter_model.safetensors"
    weights.write_bytes((saved["llama-lora-b"] / "adapter" / weights.name).read_bytes())
    with pytest.raises(RuntimeError, match="changed after it was loaded"):
        greedy(model)


def test_a_layer_serves_every_kind_in_one_batch_and_reuses_freed_slots():
    """One linear layer, rows routed to LoRA, DoRA, IA3 (input and output side) and to
    no adapter: each row equals its adapter's formula; a freed slot serves a new kind."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = AdaptedLinear(base, 1)
    a, b, m = torch.randn(2, 6), torch.randn(5, 2), torch.rand(5) + 0.5
    adapters = {
        1: LayerAdapter(lora_a=a, lora_b=b, scaling=0.5),
        2: LayerAdapter(lora_a=a, lora_b=b, scaling=0.5, magnitude=m),
        3: LayerAdapter(ia3=torch.rand(5) + 0.5),
        4: LayerAdapter(ia3=torch.rand(6) + 0.5, ia3_feedforward=True),
    }
    for slot, adapter in adapters.items():
        layer.put(slot, adapter, slot + 1)
    x = torch.randn(5, 3, 6)
    w = base.weight
    dora_w = w + 0.5 * b @ a
    dora_w = (m / torch.linalg.norm(dora_w, dim=1))[:, None] * dora_w
    expected = [
        base(x[0]),
        base(x[1]) + 0.5 * x[1] @ a.t() @ b.t(),
        x[2] @ dora_w.t() + base.bias,
        base(x[3]) * adapters[3].ia3,
        base(x[4] * adapters[4].ia3),
    ]
    with torch.no_grad(), routed(torch.arange(5)):
        batched = layer(x)
    for row in range(5):
        torch.testing.assert_close(batched[row], expected[row], atol=1e-5, rtol=1e-5)
        with torch.no_grad(), routed(row):
            torch.testing.assert_close(layer(x[row : row + 1])[0], expected[row])
    layer.drop(2)  # the DoRA slot now serves plain LoRA: no magnitude left behind
    layer.put(2, adapters[1], 5)
    with torch.no_grad(), routed(2):
        torch.testing.assert_close(layer(x[1:2])[0], expected[1])
    assert torch.equal(base(x), layer(x))  # unrouted: the base layer
