"""The GPU path, on `cuda`: run by benchmarks/gpu_check.sh on a CUDA machine; skipped
elsewhere (these CPUs have no accelerator). Tiny models, seconds each."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from caikit.core.data_model import DataStream

from caikit_tuning import (
    LoraTuning,
    PeftPromptTuning,
    TextGeneration,
    TrainGenerationRecord,
    TuningConfig,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def records(rows, n=16):
    return DataStream.from_iterable([TrainGenerationRecord(**row) for row in rows[:n]])


def test_bf16_training_with_per_example_attention(tiny_llama, train_rows):
    model = PeftPromptTuning.train(
        "tiny-llama",
        records(train_rows),
        TuningConfig(num_virtual_tokens=4),
        num_epochs=1,
        batch_size=4,
        device="cuda",
    )
    config = model.training_config
    assert next(model.base.model.parameters()).device.type == "cuda"
    assert config["torch_dtype"] == "bfloat16" and config["padded_tokens"] == 0
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in model.training_logs if "loss" in e)


def test_the_fused_lm_head_loss_on_cuda():
    import torch.nn.functional as F

    from caikit_tuning.training.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = (torch.randn(5000, 64, device="cuda") * 0.1).bfloat16()
    targets = torch.randint(0, 5000, (300,), device="cuda")
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    reference = hidden.detach().clone().requires_grad_()
    expected = F.cross_entropy(
        F.linear(reference.bfloat16(), weight).float(), targets, reduction="sum"
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=2e-2, atol=2e-3)


def test_cuda_outputs_match_cpu(tiny_llama):
    cpu = TextGeneration.bootstrap("tiny-llama", device="cpu", torch_dtype="float32")
    gpu = TextGeneration.bootstrap("tiny-llama", device="cuda", torch_dtype="float32")
    ids = torch.tensor([[3, 10, 11, 12]])
    with torch.no_grad():
        on_cpu = cpu.base.model(ids).logits
        on_gpu = gpu.base.model(ids.cuda()).logits.cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3)
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8}
    assert (
        gpu.run("the film", **kwargs).generated_text == cpu.run("the film", **kwargs).generated_text
    )


def test_the_batching_engine_on_cuda(tiny_llama):
    import concurrent.futures

    model = TextGeneration.bootstrap("tiny-llama", device="cuda")
    texts = [f"review {i}: the film" for i in range(8)]
    alone = [model.run(t, max_new_tokens=6, min_new_tokens=6).generated_text for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda t: model.run(t, max_new_tokens=6, min_new_tokens=6).generated_text, texts
            )
        )
    assert together == alone


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_saves_and_loads(tiny_llama, train_rows, tmp_path, bits):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    model = LoraTuning.train(
        "tiny-llama",
        records(train_rows, 8),
        num_epochs=1,
        device="cuda",
        quantization={"bits": bits},
    )
    model.save(str(tmp_path / "qlora"))
    loaded = LoraTuning.load(str(tmp_path / "qlora"))
    assert loaded.run("the film", max_new_tokens=3).generated_tokens >= 1


def test_torch_compile_on_cuda(tiny_llama, train_rows):
    model = PeftPromptTuning.train(
        "tiny-llama",
        records(train_rows, 8),
        TuningConfig(num_virtual_tokens=4),
        num_epochs=1,
        batch_size=4,
        device="cuda",
        optimization={"torch_compile": True},
    )
    assert model.training_config["steps"] == 2


def test_one_job_per_gpu():
    """Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), and sees it."""
    from caikit_tuning.runtime.worker_pool import plan_slots

    slots = plan_slots(
        "auto", cpu_slots=1, gpu_count=torch.cuda.device_count(), cpu_count=os.cpu_count()
    )
    assert [slot.kind for slot in slots] == ["cuda"] * torch.cuda.device_count()
    for slot in slots:
        seen = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            env=slot.environment(dict(os.environ)),
            capture_output=True,
            text=True,
            check=True,
        )
        assert seen.stdout.strip() == "1"
