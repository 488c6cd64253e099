"""A small client for a caikit_tuning runtime: train over gRPC, generate over REST or gRPC.

from caikit_tuning.runtime.client import TuningClient

client = TuningClient("localhost:8085", "http://localhost:8080")
job = client.train_prompt_tuning("my-model", "SmolLM2-135M-Instruct", records=[...])
client.wait(job)
print(client.generate("my-model", "A fine film.")["generated_text"])
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from caikit.interfaces.runtime.data_model import TrainingInfoRequest
from caikit.runtime.service_factory import ServicePackageFactory
from google.protobuf import json_format

import caikit_tuning  # noqa: F401  (configures caikit: the service names derive from it)

TERMINAL_STATES = ("COMPLETED", "ERRORED", "CANCELED")


class RuntimeCallError(RuntimeError):
    """An error answer from the runtime, with its HTTP or gRPC code."""

    def __init__(self, code: Any, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TuningClient:
    def __init__(
        self,
        grpc_target: str = "localhost:8085",
        http_url: str = "http://localhost:8080",
        channel: grpc.Channel | None = None,
        ca_certificate: bytes | None = None,
        api_key: str | None = None,
    ):
        """`ca_certificate` (PEM) switches both transports to TLS, trusting that CA;
        `api_key` is sent with every call (servers with runtime.auth keys need one)."""
        self.http_url = http_url.rstrip("/")
        self._auth = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._ssl = None
        if ca_certificate is not None:
            self._ssl = ssl.create_default_context(cadata=ca_certificate.decode())
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_certificate)
            channel = channel or grpc.secure_channel(grpc_target, credentials)
        self.channel = channel or grpc.insecure_channel(grpc_target)
        # Building the stubs makes caikit warn, once per module, that a module with two
        # tasks names its train RPC after the first: expected here, and noise to a client.
        names_log = logging.getLogger("RNTM-NAMES")
        if names_log.level == logging.NOTSET:
            names_log.setLevel(logging.ERROR)
        factory = ServicePackageFactory
        self._training = factory.get_service_package(factory.ServiceType.TRAINING)
        self._inference = factory.get_service_package(factory.ServiceType.INFERENCE)
        management = factory.get_service_package(factory.ServiceType.TRAINING_MANAGEMENT)
        self._train_stub = self._training.stub_class(self.channel)
        self._inference_stub = self._inference.stub_class(self.channel)
        self._management_stub = management.stub_class(self.channel)

    # ------------------------------------------------------------- training

    def train(
        self,
        module: str,
        model_name: str,
        base_model: str,
        records: list[dict] | None = None,
        file: str | None = None,
        **parameters: Any,
    ) -> str:
        """Submit a training job for `module` (a module class name, e.g. "TextGeneration");
        returns its training id.

        Give the data inline (`records`: dicts with input/output) or as a `file` name
        under the server's data_streams.file_source_base. Other keyword arguments are
        the module's train() parameters (num_epochs, learning_rate, verbalizer, ...).
        """
        rpc = f"TextGenerationTask{module}Train"
        request_type = getattr(self._training.messages, f"{rpc}Request")
        body = {"base_model": base_model, **parameters}
        if records is not None:
            body["train_stream"] = {"jsondata": {"data": records}}
        if file is not None:
            body["train_stream"] = {"file": {"filename": file}}
        request = json_format.ParseDict(
            {"model_name": model_name, "parameters": body}, request_type()
        )
        try:
            return getattr(self._train_stub, rpc)(request, metadata=self._auth).training_id
        except grpc.RpcError as err:
            raise RuntimeCallError(err.code(), err.details()) from err

    def train_prompt_tuning(
        self,
        model_name: str,
        base_model: str,
        records: list[dict] | None = None,
        file: str | None = None,
        tuning_config: dict | None = None,
        **parameters: Any,
    ) -> str:
        """Submit a PeftPromptTuning job (tuning_config defaults to 8 virtual tokens)."""
        return self.train(
            "PeftPromptTuning",
            model_name,
            base_model,
            records=records,
            file=file,
            tuning_config=tuning_config or {"num_virtual_tokens": 8},
            **parameters,
        )

    def training_status(self, training_id: str) -> dict:
        request = TrainingInfoRequest(training_id=training_id).to_proto()
        try:
            response = self._management_stub.GetTrainingStatus(request, metadata=self._auth)
        except grpc.RpcError as err:
            raise RuntimeCallError(err.code(), err.details()) from err
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def cancel(self, training_id: str) -> dict:
        request = TrainingInfoRequest(training_id=training_id).to_proto()
        response = self._management_stub.CancelTraining(request, metadata=self._auth)
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def wait(
        self,
        training_id: str,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        on_status: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the job ends; `on_status` sees every status (progress included)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.training_status(training_id)
            if on_status:
                on_status(status)
            if status.get("state") in TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training {training_id} still {status.get('state')}")
            time.sleep(poll_seconds)

    # ------------------------------------------------------------ inference

    def generate(self, model_id: str, text: str, **parameters: Any) -> dict:
        """Unary generation over REST."""
        return self._post("/api/v1/task/text-generation", self._body(model_id, text, parameters))

    def stream(self, model_id: str, text: str, **parameters: Any) -> Iterator[dict]:
        """Streaming generation over REST (server-sent events), one dict per message."""
        request = self._request(
            "/api/v1/task/server-streaming-text-generation", self._body(model_id, text, parameters)
        )
        try:
            with urllib.request.urlopen(request, context=self._ssl) as response:
                event = None
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line.split(":", 1)[1])
                        if event == "error":
                            raise RuntimeCallError(data.get("code"), data.get("details", ""))
                        yield data
                        event = None
        except urllib.error.HTTPError as err:
            raise _http_error(err) from err

    def tokenize(self, model_id: str, text: str) -> dict:
        """The model's tokens of `text`, with offsets, over REST."""
        return self._post("/api/v1/task/tokenization", self._body(model_id, text, {}))

    def generate_grpc(self, model_id: str, text: str, **parameters: Any) -> dict:
        request = json_format.ParseDict(
            {"text": text, **parameters}, self._inference.messages.TextGenerationTaskRequest()
        )
        try:
            response = self._inference_stub.TextGenerationTaskPredict(
                request, metadata=[("mm-model-id", model_id), *self._auth]
            )
        except grpc.RpcError as err:
            raise RuntimeCallError(err.code(), err.details()) from err
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def stream_grpc(self, model_id: str, text: str, **parameters: Any) -> Iterator[dict]:
        request = json_format.ParseDict(
            {"text": text, **parameters},
            self._inference.messages.ServerStreamingTextGenerationTaskRequest(),
        )
        try:
            for message in self._inference_stub.ServerStreamingTextGenerationTaskPredict(
                request, metadata=[("mm-model-id", model_id), *self._auth]
            ):
                yield json_format.MessageToDict(message, preserving_proto_field_name=True)
        except grpc.RpcError as err:
            raise RuntimeCallError(err.code(), err.details()) from err

    # ---------------------------------------------------------------- http

    @staticmethod
    def _body(model_id: str, text: str, parameters: dict) -> dict:
        body: dict[str, Any] = {"model_id": model_id, "inputs": text}
        if parameters:
            body["parameters"] = parameters
        return body

    def _request(self, path: str, body: dict) -> urllib.request.Request:
        return urllib.request.Request(
            self.http_url + path,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", **dict(self._auth)},
            method="POST",
        )

    def _post(self, path: str, body: dict) -> dict:
        try:
            with urllib.request.urlopen(self._request(path, body), context=self._ssl) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise _http_error(err) from err


def _http_error(err: urllib.error.HTTPError) -> RuntimeCallError:
    try:
        details = json.loads(err.read()).get("details", "")
    except (ValueError, AttributeError):
        details = err.reason
    return RuntimeCallError(err.code, details)
