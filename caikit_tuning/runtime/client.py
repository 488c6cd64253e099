"""A small client for a caikit_tuning runtime: train over gRPC, generate over REST or gRPC.

from caikit_tuning.runtime.client import TuningClient

client = TuningClient("localhost:8085", "http://localhost:8080")
job = client.train_prompt_tuning("my-model", "SmolLM2-135M-Instruct", records=[...])
client.wait(job)
print(client.generate("my-model", "A fine film.")["generated_text"])

It learns the server's gRPC services and messages from the server itself (gRPC
reflection), so it works with any service naming (caikit-nlp's `caikit.runtime.Nlp`,
or another `runtime.service_generation` domain) and needs no local caikit config.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

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
        self._api: _ServerApi | None = None

    @property
    def api(self) -> _ServerApi:
        """The server's gRPC methods, learned by reflection on first use."""
        if self._api is None:
            try:
                self._api = _ServerApi(self.channel)
            except grpc.RpcError as err:
                raise RuntimeCallError(err.code(), err.details()) from err
        return self._api

    def _call(self, method: str, body: dict, metadata: list | None = None, stream: bool = False):
        call, request_type = self.api.method(method, stream)
        request = json_format.ParseDict(body, request_type())
        return call(request, metadata=[*(metadata or []), *self._auth])

    def _unary(self, method: str, body: dict, metadata: list | None = None):
        """One unary call's answer; an error answer raises RuntimeCallError."""
        try:
            return self._call(method, body, metadata)
        except grpc.RpcError as err:
            raise RuntimeCallError(err.code(), err.details()) from err

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
        body = {"base_model": base_model, **parameters}
        if records is not None:
            body["train_stream"] = {"jsondata": {"data": records}}
        if file is not None:
            body["train_stream"] = {"file": {"filename": file}}
        request = {"model_name": model_name, "parameters": body}
        return self._unary(f"TextGenerationTask{module}Train", request).training_id

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
        return _as_dict(self._unary("GetTrainingStatus", {"training_id": training_id}))

    def cancel(self, training_id: str) -> dict:
        return _as_dict(self._unary("CancelTraining", {"training_id": training_id}))

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
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if not line.startswith("data:"):
                        continue  # blank separators, and event names some servers send
                    data = json.loads(line.split(":", 1)[1])
                    # An error event carries `code` and `details` (named or not).
                    if "code" in data and "details" in data:
                        raise RuntimeCallError(data["code"], data["details"])
                    yield data
        except urllib.error.HTTPError as err:
            raise _http_error(err) from err

    def tokenize(self, model_id: str, text: str) -> dict:
        """The model's tokens of `text`, with offsets, over REST."""
        return self._post("/api/v1/task/tokenization", self._body(model_id, text, {}))

    def generate_grpc(self, model_id: str, text: str, **parameters: Any) -> dict:
        body, metadata = {"text": text, **parameters}, [("mm-model-id", model_id)]
        return _as_dict(self._unary("TextGenerationTaskPredict", body, metadata))

    def stream_grpc(self, model_id: str, text: str, **parameters: Any) -> Iterator[dict]:
        try:
            for message in self._call(
                "ServerStreamingTextGenerationTaskPredict",
                {"text": text, **parameters},
                [("mm-model-id", model_id)],
                stream=True,
            ):
                yield _as_dict(message)
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


class _ServerApi:
    """A server's methods by name (`TextGenerationTaskPredict`, `GetTrainingStatus`, ...),
    with their request types, from gRPC reflection."""

    def __init__(self, channel: grpc.Channel):
        self._channel = channel
        database = ProtoReflectionDescriptorDatabase(channel)
        self._pool = DescriptorPool(database)
        self._methods = {
            method.name: method
            for name in database.get_services()
            if name.startswith("caikit.runtime.")
            for method in self._pool.FindServiceByName(name).methods
        }
        self._calls: dict[tuple[str, bool], tuple] = {}

    def method(self, name: str, stream: bool = False):
        key = (name, stream)
        if key not in self._calls:
            method = self._methods.get(name)
            if method is None:
                raise RuntimeCallError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"the server has no method {name}; it has {sorted(self._methods)}",
                )
            request_type = GetMessageClass(method.input_type)
            response_type = GetMessageClass(method.output_type)
            path = f"/{method.containing_service.full_name}/{method.name}"
            factory = self._channel.unary_stream if stream else self._channel.unary_unary
            call = factory(
                path,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            self._calls[key] = (call, request_type)
        return self._calls[key]


def _as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _http_error(err: urllib.error.HTTPError) -> RuntimeCallError:
    try:
        details = json.loads(err.read()).get("details", "")
    except (ValueError, AttributeError):
        details = err.reason
    return RuntimeCallError(err.code, details)
