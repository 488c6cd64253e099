"""Tracking against a local MLflow file store, and the loss curve saved with a model."""

import caikit
import pytest
from caikit.core.data_model import DataStream

from caikit_tuning import PeftPromptTuning, TrainGenerationRecord, TuningConfig
from caikit_tuning.training.tracking import run_name

RECORDS = [TrainGenerationRecord(input="a fine film", output="positive")] * 8


@pytest.fixture
def mlflow_folder(tmp_path, base_models_dir):
    folder = tmp_path / "mlruns"
    caikit.configure(
        config_dict={"tracking": {"mlflow": {"tracking_uri": str(folder), "experiment": "tests"}}}
    )
    yield folder
    caikit.configure(config_dict={"tracking": {"mlflow": {"tracking_uri": None}}})


def test_mlflow_gets_params_metrics_and_the_model_path(mlflow_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    with run_name("tracked-model"):
        model = PeftPromptTuning.train(
            "tiny-llama",
            DataStream.from_iterable(RECORDS),
            TuningConfig(num_virtual_tokens=2),
            num_epochs=2,
            batch_size=4,
            val_stream=DataStream.from_iterable(RECORDS[:4]),
        )
    model.save(str(tmp_path / "saved"))
    run_id = model.training_config["tracking_run_id"]
    client = MlflowClient(tracking_uri=mlflow_folder.as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "tracked-model" and run.info.status == "FINISHED"
    assert (
        run.data.params["learning_rate"] == "0.3" and run.data.params["base_model"] == "tiny-llama"
    )
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "validation_loss")) == 2
    assert run.data.tags["model_path"] == str((tmp_path / "saved").resolve())


def test_loss_curve_png_is_saved(base_models_dir, tmp_path):
    model = PeftPromptTuning.train(
        "tiny-llama",
        DataStream.from_iterable(RECORDS),
        TuningConfig(num_virtual_tokens=2),
        num_epochs=2,
        batch_size=4,
    )
    model.save(str(tmp_path / "m"))
    png = (tmp_path / "m" / "training_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
