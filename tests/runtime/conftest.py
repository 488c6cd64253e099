"""A real caikit_tuning runtime in a subprocess, on free loopback ports."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from caikit_tuning.runtime.client import TuningClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Runtime:
    """One server process and the folders it uses."""

    def __init__(
        self,
        root: Path,
        base_models_dir: Path,
        trainer: dict | None = None,
        extra: dict | None = None,
        ca_certificate: bytes | None = None,
    ):
        self.root = root
        self.models = root / "served"
        self.data = root / "data"
        self.models.mkdir(parents=True)
        self.data.mkdir()
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        config = {
            "runtime": {
                "library": "caikit_tuning",
                "bind_host": "127.0.0.1",
                "local_models_dir": str(self.models),
                "lazy_load_local_models": True,
                "lazy_load_poll_period_seconds": 1,
                "training": {"output_dir": str(self.models), "save_with_id": False},
                "grpc": {"enabled": True, "port": self.grpc_port},
                "http": {"enabled": True, "port": self.http_port},
                "metrics": {"enabled": True, "port": self.metrics_port},
            },
            "log": {"level": "warning"},
            "data_streams": {"file_source_base": str(self.data)},
            "base_models_dir": str(base_models_dir),
            "restrict_base_models_to_dir": True,
            "model_management": {
                "trainers": {
                    "default": {
                        "type": "WORKER_POOL",
                        "import_class": "caikit_tuning.runtime.worker_pool.WorkerPoolTrainer",
                        "config": trainer
                        or {"gpus": [], "cpu_slots": 1, "cancel_grace_seconds": 2},
                    }
                }
            },
        }
        _merge(config, extra or {})
        self.ca_certificate = ca_certificate
        self.config_file = root / "runtime_config.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_file = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "Runtime":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("CONFIG_FILES", None)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "caikit_tuning.runtime", "--config", str(self.config_file)],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_file.read_text()[-3000:]}")
            if "runtime ready" in self.log_file.read_text(errors="replace")[offset:]:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log_file.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the server dies without any chance to clean up."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def client(self) -> TuningClient:
        scheme = "https" if self.ca_certificate else "http"
        return TuningClient(
            f"localhost:{self.grpc_port}",
            f"{scheme}://localhost:{self.http_port}",
            ca_certificate=self.ca_certificate,
        )


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture(scope="session")
def runtime(tmp_path_factory, base_models_dir):
    server = Runtime(tmp_path_factory.mktemp("runtime"), base_models_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(runtime) -> TuningClient:
    return runtime.client
