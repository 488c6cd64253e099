import math

import pytest

from caikit_tuning.training import TrainingSettings
from caikit_tuning.training.schedule import lr_factor


def test_linear_cosine_constant_with_warmup():
    assert [round(lr_factor(s, 10, 0, "linear"), 2) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(0, 10, 4, "linear") == pytest.approx(0.2)
    assert lr_factor(3, 10, 4, "linear") == pytest.approx(0.8)
    assert lr_factor(4, 10, 4, "linear") == pytest.approx(1.0)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_total_batch_size_derives_micro_batch_and_accumulation():
    settings = TrainingSettings.from_request(
        optimization={"total_train_batch_size": 32, "max_per_device_train_batch_size": 4}
    )
    assert (settings.micro_batch_size, settings.accumulation, settings.global_batch_size) == (
        4,
        8,
        32,
    )
    two = TrainingSettings.from_request(
        num_processes=2,
        optimization={"total_train_batch_size": 32, "max_per_device_train_batch_size": 4},
    )
    assert (two.micro_batch_size, two.accumulation, two.global_batch_size) == (4, 4, 32)
    small = TrainingSettings.from_request(optimization={"total_train_batch_size": 6})
    assert (small.micro_batch_size, small.accumulation) == (6, 1)


def test_lr_scaling_by_global_batch():
    base = {"learning_rate": 0.01, "batch_size": 4, "accumulate_steps": 4}
    assert TrainingSettings.from_request(**base).peak_learning_rate == 0.01
    assert TrainingSettings.from_request(
        **base, optimization={"lr_scaling": "sqrt"}
    ).peak_learning_rate == pytest.approx(0.04)
    assert TrainingSettings.from_request(
        **base, optimization={"lr_scaling": "linear"}
    ).peak_learning_rate == pytest.approx(0.16)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"optimization": {"total_train_batch_size": 10, "max_per_device_train_batch_size": 4}},
            "multiple of processes x micro-batch",
        ),
        ({"accumulate_steps": 2, "optimization": {"total_train_batch_size": 8}}, "not both"),
        (
            {"optimization": {"max_per_device_train_batch_size": 4}},
            "needs `optimization.total_train_batch_size`",
        ),
        (
            {"optimization": {"lr_scheduler": "step"}},
            r"`optimization.lr_scheduler` must be one of \['linear', 'cosine', 'constant'\]",
        ),
        ({"optimization": {"lr_scaling": "cubic"}}, "`optimization.lr_scaling` must be one of"),
        ({"optimization": {"warmup_steps": 2, "warmup_ratio": 0.1}}, "not both"),
        ({"optimization": {"bogus": 1}}, r"unknown field\(s\) \['bogus'\]"),
        ({"validation": {"split_ratio": 0.95}}, r"`validation.split_ratio` must be in \[0, 0.9\]"),
        (
            {"validation": {"early_stopping_patience": 0}},
            "`validation.early_stopping_patience` must be >= 1",
        ),
        ({"checkpoint_steps": 0}, "`checkpoint_steps` must be >= 1"),
    ],
)
def test_bad_settings_name_the_field(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainingSettings.from_request(**values)
