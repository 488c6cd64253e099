"""Continuous batching across requests and prompt models, and shared base models."""

import gc
import threading
import time

import pytest
import torch
from caikit.core.data_model import DataStream
from caikit.interfaces.nlp.data_model import FinishReason

from caikit_tuning import PeftPromptTuning, TextGeneration, TrainGenerationRecord, TuningConfig
from caikit_tuning.base_models import registry
from caikit_tuning.generation import GenerationSettings
from caikit_tuning.generation.batching import BatchingEngine, QueueFull, engine_for
from caikit_tuning.generation.decoding import NonFiniteScores
from caikit_tuning.generation.stream import prepare_prompt, stream_generation
from caikit_tuning.inputs.prefix import PromptPrefix

PROMPTS = [
    "the film is",
    "a long and winding story about nothing at all, really",
    "why",
    "it was a dark night",
]


@pytest.fixture(scope="module")
def prompt_models(base_models_dir, tmp_path_factory):
    """Two prompt models on tiny-llama, saved and loaded (so they share the base)."""
    folder = tmp_path_factory.mktemp("prompts")
    paths = []
    for seed, label in ((1, "positive"), (2, "negative")):
        rows = [TrainGenerationRecord(input="a film", output=label)] * 8
        model = PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(rows),
            TuningConfig(num_virtual_tokens=3 + seed),
            num_epochs=2,
            seed=seed,
        )
        model.save(str(folder / label))
        paths.append(folder / label)
    return [PeftPromptTuning.load(str(p)) for p in paths]


def unbatched(model, text, **values):
    settings = GenerationSettings.from_request(**values)
    generator = model.generator
    prompt = prepare_prompt(
        generator.model, generator.tokenizer, model.model_input(text), generator.prefix, settings
    )
    return "".join(
        e.text
        for e in stream_generation(
            generator.model, generator.tokenizer, prompt, generator.prefix, settings
        )
    )


def run_concurrently(calls):
    results = [None] * len(calls)

    def work(i, call):
        results[i] = call()

    threads = [threading.Thread(target=work, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_loaded_prompt_models_share_one_base(prompt_models):
    first, second = prompt_models
    assert first.base is second.base
    assert first.base.model is second.base.model


def test_greedy_batched_equals_unbatched_across_prompt_models(prompt_models):
    engine = engine_for(prompt_models[0].base.model)
    calls, expected = [], []
    for model in prompt_models:
        for text in PROMPTS:
            calls.append(
                lambda m=model, t=text: (
                    m.run(t, max_new_tokens=12, min_new_tokens=12).generated_text
                )
            )
            expected.append(unbatched(model, text, max_new_tokens=12, min_new_tokens=12))
    before = engine.max_rows_seen
    assert run_concurrently(calls) == expected
    assert engine.max_rows_seen >= 2 or before >= 2  # several models' rows ran in one batch


def test_per_request_parameters_inside_one_batch(prompt_models):
    model = prompt_models[0]
    free = unbatched(model, "the film is", max_new_tokens=10, min_new_tokens=10)
    stop = free[3:6]
    calls = [
        lambda: model.run(
            "the film is", max_new_tokens=10, min_new_tokens=10, stop_sequences=[stop]
        ),
        lambda: model.run("the film is", max_new_tokens=3, min_new_tokens=3),
        lambda: model.run(
            "the film is", decoding_method="SAMPLING", seed=7, max_new_tokens=10, min_new_tokens=10
        ),
        lambda: prompt_models[1].run("why", max_new_tokens=10, min_new_tokens=10),
    ]
    stopped, short, sampled, other = run_concurrently(calls)
    assert (
        stopped.finish_reason == FinishReason.STOP_SEQUENCE
        and stopped.generated_text == free[: free.index(stop)]
    )
    assert short.generated_tokens == 3 and short.finish_reason == FinishReason.MAX_TOKENS
    again = model.run(
        "the film is", decoding_method="SAMPLING", seed=7, max_new_tokens=10, min_new_tokens=10
    )
    assert sampled.generated_text == again.generated_text
    assert other.generated_text == unbatched(
        prompt_models[1], "why", max_new_tokens=10, min_new_tokens=10
    )


def test_a_short_request_does_not_wait_for_a_long_one(prompt_models):
    model = prompt_models[0]
    finished = {}

    def long():
        model.run("the film is", max_new_tokens=300, min_new_tokens=300)
        finished["long"] = time.monotonic()

    def short():
        time.sleep(0.05)
        model.run("why", max_new_tokens=2, min_new_tokens=2)
        finished["short"] = time.monotonic()

    run_concurrently([long, short])
    assert finished["short"] < finished["long"]


def test_a_dropped_stream_stops_consuming_compute(prompt_models):
    model = prompt_models[0]
    engine = engine_for(model.base.model)
    stream = iter(model.run_stream_out("the film is", max_new_tokens=400, min_new_tokens=400))
    next(stream)
    next(stream)
    stream.close()
    time.sleep(0.2)
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps - steps <= 1  # the row left the batch: no more steps for it


def test_a_row_whose_scores_go_non_finite_fails_alone(prompt_models):
    """One request's NaN scores (here a broken soft prompt) end that request with a
    clear error; the requests batched with it finish exactly as they would alone."""
    model = prompt_models[0]
    generator = model.generator
    engine = engine_for(generator.model)
    settings = GenerationSettings(max_new_tokens=12, min_new_tokens=12)
    broken = PromptPrefix(decoder=torch.full_like(generator.prefix.decoder, float("nan")))

    def submit(prefix, text):
        prompt = prepare_prompt(generator.model, generator.tokenizer, text, prefix, settings)
        return engine.submit(generator.tokenizer, prompt, prefix, settings)

    def collect(prefix, text):
        try:
            return "".join(event.text for event in submit(prefix, text))
        except NonFiniteScores as err:
            return err

    texts = [model.model_input(t) for t in PROMPTS]
    calls = [lambda t=t: collect(generator.prefix, t) for t in texts]
    calls.insert(2, lambda: collect(broken, texts[0]))
    results = run_concurrently(calls)
    failed = results.pop(2)
    assert isinstance(failed, NonFiniteScores) and "NaN or infinite" in str(failed)
    assert results == [unbatched(model, t, max_new_tokens=12, min_new_tokens=12) for t in PROMPTS]


def test_cancelling_a_waiting_reader_frees_it_and_its_row_at_once(prompt_models):
    """A transport cancels a stream while its reader waits for the next token (the
    client went away): the reader returns at once and the row leaves the batch."""
    model = prompt_models[0]
    engine = engine_for(model.base.model)
    stream = model.run_stream_out("the film is", max_new_tokens=400, min_new_tokens=400)
    next(stream)
    ended = threading.Event()

    def read_rest():
        for _ in stream:
            pass
        ended.set()

    threading.Thread(target=read_rest, daemon=True).start()
    time.sleep(0.1)
    stream.cancel()
    assert ended.wait(1.0)
    time.sleep(0.2)
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps - steps <= 1


def test_a_full_queue_refuses_with_resource_exhausted(prompt_models):
    model = prompt_models[0]
    engine = BatchingEngine(model.base.model, max_batch_size=1, max_queue_size=1)
    generator = model.generator
    settings = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    prompt = prepare_prompt(generator.model, generator.tokenizer, "x", generator.prefix, settings)
    streams = [engine.submit(generator.tokenizer, prompt, generator.prefix, settings)]
    next(streams[0])  # the first request runs; the queue is empty again
    streams.append(engine.submit(generator.tokenizer, prompt, generator.prefix, settings))
    with pytest.raises(QueueFull) as caught:
        engine.submit(generator.tokenizer, prompt, generator.prefix, settings)
    assert caught.value.status_code.name == "RESOURCE_EXHAUSTED"
    for stream in streams:
        stream.close()


def test_the_last_unloaded_model_releases_the_base(base_models_dir):
    gc.collect()
    before = registry.shared_count()
    first = TextGeneration.bootstrap("tiny-t5")
    second = TextGeneration.bootstrap("tiny-t5")
    assert first.base is second.base and registry.shared_count() == before + 1
    del first, second
    gc.collect()
    assert registry.shared_count() == before
