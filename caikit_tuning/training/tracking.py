"""Experiment tracking: MLflow when configured (tracking.mlflow.tracking_uri).

training_logs.jsonl is always written with the model; MLflow gets the run's
parameters, every logged metric by step, and the saved model's path.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alog

from ..config import library_settings

log = alog.use_channel("TRACK")

_RUN_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tracking_run_name", default=None
)


@contextlib.contextmanager
def run_name(name: str) -> Iterator[None]:
    """Name the tracked runs started in this block (the runtime uses the model name)."""
    token = _RUN_NAME.set(name)
    try:
        yield
    finally:
        _RUN_NAME.reset(token)


class Tracker:
    """Logs one training run; a no-op unless MLflow tracking is configured."""

    def __init__(self, params: dict[str, Any], enabled: bool = True):
        """`enabled` False (a data-parallel process other than rank 0): log nothing."""
        self.run_id: str | None = None
        settings = library_settings()
        uri = settings.mlflow_tracking_uri
        if not uri or not enabled:
            self._client = None
            return
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ValueError(
                "tracking.mlflow.tracking_uri is set but MLflow is not installed: "
                "pip install 'caikit-tuning[tracking]'."
            ) from err

        if "://" not in str(uri):
            # A local folder: MLflow 3 keeps its file store behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = Path(uri).resolve().as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        experiment = settings.mlflow_experiment
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=_RUN_NAME.get())
        self.run_id = run.info.run_id
        flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
        self._client.log_batch(
            self.run_id, params=[mlflow.entities.Param(k, v) for k, v in flat.items()]
        )
        log.info("tracking to MLflow run %s at %s", self.run_id, uri)

    def log(self, entry: dict) -> None:
        if self._client is None:
            return
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._client.log_metric(self.run_id, key, float(value), step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)


def record_model_path(run_id: str | None, path: str) -> None:
    """Tag a finished run with where its model was saved."""
    uri = library_settings().mlflow_tracking_uri
    if not run_id or not uri:
        return
    from mlflow.tracking import MlflowClient

    if "://" not in str(uri):
        uri = Path(uri).resolve().as_uri()
    MlflowClient(tracking_uri=uri).set_tag(run_id, "model_path", str(Path(path).resolve()))


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
