"""No request, disconnect or payload stops the server or harms other clients' requests.

Each class of fault an outside tester found gets a test against a real server: numeric
blow-ups, backtracking regexes, dropped streams, oversized and slow requests, model
names, undecodable messages, leaked server paths, and the operator's defaults
(authentication, Host names, the unix socket, bounded shutdown).
"""

import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import grpc
import psutil
import pytest

from caikit_tuning import TextGeneration
from caikit_tuning.runtime.client import RuntimeCallError
from caikit_tuning.runtime.process import RuntimeProcess
from caikit_tuning.runtime.settings import ServingSettings

from .conftest import Runtime
from .test_training_jobs import RECORDS, assert_serving, tuning

GENERATE = "/api/v1/task/text-generation"
STREAM = "/api/v1/task/server-streaming-text-generation"
API_KEY = "k" * 24


@pytest.fixture(scope="module")
def base_id(runtime):
    TextGeneration.bootstrap("tiny-llama").save(str(runtime.models / "robust-base"))
    return "robust-base"


def post(port, path, body, headers=None, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def raw_stream_request(port, body: dict, host="localhost") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {STREAM} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


# ------------------------------------------------------------- numeric blow-ups


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"decoding_method": "SAMPLING", "temperature": 1e-300}, "temperature"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        (
            {"exponential_decay_length_penalty": {"start_index": 0, "decay_factor": 1e308}},
            "decay_factor",
        ),
        ({"decoding_method": "SAMPLING", "seed": 10**30}, "seed"),
        ({"num_beams": 4096}, "num_beams"),
    ],
)
def test_numerically_unsafe_values_are_400_naming_the_field(
    runtime, client, base_id, parameters, field
):
    status, body = post(
        runtime.http_port, GENERATE, {"model_id": base_id, "inputs": "x", "parameters": parameters}
    )
    assert status == 400 and field in json.loads(body)["details"]
    if field != "seed":  # gRPC's seed is a uint64: it cannot overflow there
        with pytest.raises(RuntimeCallError) as caught:
            client.generate_grpc(base_id, "x", **parameters)
        assert (
            caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in caught.value.message
        )


def test_a_bad_request_among_concurrent_streams_harms_none_of_them(runtime, client, base_id):
    expected = client.generate(base_id, "the film is", max_new_tokens=12, min_new_tokens=12)
    results, errors = [], []

    def good():
        chunks = list(client.stream(base_id, "the film is", max_new_tokens=12, min_new_tokens=12))
        results.append("".join(c["generated_text"] for c in chunks))

    def bad():
        try:
            list(client.stream(base_id, "x", decoding_method="SAMPLING", temperature=1e-300))
        except RuntimeCallError as err:
            errors.append(err.code)

    threads = [threading.Thread(target=good) for _ in range(12)] + [threading.Thread(target=bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [expected["generated_text"]] * 12
    assert errors == [400]


# --------------------------------------------------------------------- regex


def test_a_backtracking_regex_label_does_not_freeze_the_server(runtime, base_id):
    pattern = "x=(?:[\\s\\S]?){40}QQQ"  # exponential for a backtracking engine
    done = {}

    def classify():
        done["answer"] = post(
            runtime.http_port,
            GENERATE,
            {
                "model_id": base_id,
                "inputs": "x" * 60,
                "parameters": {
                    "max_new_tokens": 40,
                    "min_new_tokens": 40,
                    "labels": [pattern],
                    "label_match": "regex",
                },
            },
        )

    worker = threading.Thread(target=classify)
    started = time.monotonic()
    worker.start()
    assert get(runtime.http_port, "/health")[0] == 200
    worker.join(30)
    assert done["answer"][0] == 200 and time.monotonic() - started < 10
    status, body = post(
        runtime.http_port,
        GENERATE,
        {
            "model_id": base_id,
            "inputs": "x",
            "parameters": {"labels": ["a=(x)\\1"], "label_match": "regex"},
        },
    )
    assert status == 400 and b"RE2" in body


# ------------------------------------------------------------ dropped streams


def test_dropped_streams_free_their_threads_and_rows(runtime, client, base_id):
    """More streams than the server's thread pool (100), each reset after its first
    event: every thread comes back, and REST and gRPC inference go on."""
    server = psutil.Process(runtime.process.pid)
    request = raw_stream_request(
        runtime.http_port,
        {"model_id": base_id, "inputs": "the film", "parameters": {"max_new_tokens": 300}},
    )
    client.generate(base_id, "warm up", max_new_tokens=2)
    threads_before = server.num_threads()
    for _ in range(120):
        sock = socket.create_connection(("127.0.0.1", runtime.http_port))
        sock.sendall(request)
        received = b""
        while b"data:" not in received:
            received += sock.recv(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: the client is gone
    time.sleep(1.0)
    assert server.num_threads() <= threads_before + 8
    started = time.monotonic()
    assert client.generate(base_id, "x", max_new_tokens=2)["generated_tokens"] >= 1
    assert int(client.generate_grpc(base_id, "x", max_new_tokens=2)["generated_tokens"]) >= 1
    assert time.monotonic() - started < 5
    assert_serving(runtime, client)


def test_a_cancelled_grpc_stream_is_answered_and_the_server_goes_on(runtime, client, base_id):
    calls = client.stream_grpc(base_id, "the film", max_new_tokens=400, min_new_tokens=400)
    next(calls)
    calls.close()
    assert int(client.generate_grpc(base_id, "x", max_new_tokens=2)["generated_tokens"]) >= 1


# --------------------------------------------------------------- size limits


def test_a_huge_body_is_413_before_it_is_read(runtime, base_id):
    server = psutil.Process(runtime.process.pid)
    rss_before = server.memory_info().rss
    body = b'{"model_id": "robust-base", "inputs": "' + b"a" * (50 * 2**20) + b'"}'
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", runtime.http_port))
    sock.sendall(
        f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    answer = sock.recv(200)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    # Without a Content-Length (chunked), the body is cut off at the limit too.
    status, _ = post(runtime.http_port, GENERATE, body[: 5 * 2**20])
    assert status == 413
    assert server.memory_info().rss - rss_before < 200 * 2**20


def test_oversized_headers_are_refused(runtime):
    sock = socket.create_connection(("127.0.0.1", runtime.http_port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (16 * 2**20))
    assert sock.recv(200).startswith(b"HTTP/1.1 431")
    sock.close()
    many = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    sock = socket.create_connection(("127.0.0.1", runtime.http_port))
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: localhost\r\n{many}\r\n".encode())
    assert sock.recv(200).startswith(b"HTTP/1.1 431")
    sock.close()


def test_error_answers_quote_only_an_excerpt_of_the_input(runtime, base_id):
    status, body = post(
        runtime.http_port, GENERATE, {"model_id": base_id, "inputs": "x", "bogus": "b" * 2**20}
    )
    assert status == 422 and len(body) < 4096 and b"1048576 characters" in body


# -------------------------------------------------------------- model names


@pytest.mark.parametrize(
    "name", ["n" * 255, "team/.hidden", "caf\u00e9", "a/b/c/d", "-leading-dash", "with space"]
)
def test_model_names_follow_one_rule_at_submission(runtime, client, name):
    with pytest.raises(RuntimeCallError) as caught:
        client.train_prompt_tuning(name, "tiny-llama", records=RECORDS, **tuning(num_epochs=1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in caught.value.message


def test_the_same_rule_answers_inference(runtime, client):
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("m" * 300, "x")
    assert caught.value.code == 400 and "model_id" in caught.value.message
    with pytest.raises(RuntimeCallError) as caught:
        client.generate_grpc("m" * 300, "x")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_training_never_replaces_or_nests_in_another_model(runtime, client):
    TextGeneration.bootstrap("tiny-llama").save(str(runtime.models / "ns" / "child"))
    for name, why in (("ns", "holding other models"), ("ns/child/inner", "inside the model")):
        with pytest.raises(RuntimeCallError) as caught:
            client.train_prompt_tuning(name, "tiny-llama", records=RECORDS, **tuning(num_epochs=1))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and why in caught.value.message
    assert (runtime.models / "ns" / "child" / "config.yml").is_file()
    assert client.generate("ns/child", "x", max_new_tokens=1)["generated_tokens"] == 1


# ------------------------------------------------------- codes and messages


def test_undecodable_protobuf_is_invalid_argument(runtime):
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}")
    call = channel.unary_unary("/caikit.runtime.Nlp.NlpService/TextGenerationTaskPredict")
    for garbage in (b"\xff\xff\xff\xff\x0f garbage", b"\x0a\x80"):  # junk; a truncated field
        with pytest.raises(grpc.RpcError) as caught:
            call(garbage, metadata=[("mm-model-id", "robust-base")], timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf" in caught.value.details()
    channel.close()


def test_output_path_is_refused_by_name(runtime):
    status, body = post(
        runtime.http_port,
        "/api/v1/TextGenerationTaskPeftPromptTuningTrain",
        {
            "model_name": "with-output-path",
            "output_path": {"path": "/tmp/elsewhere"},
            "parameters": {
                "base_model": "tiny-llama",
                "train_stream": {"data_stream": {"data": RECORDS}},
                "tuning_config": {"num_virtual_tokens": 2},
            },
        },
    )
    assert status == 400 and b"output_path" in body


def test_answers_never_show_server_paths(runtime, client, base_id):
    root = str(runtime.root.resolve())
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("../outside", "x")
    assert root not in caught.value.message
    broken = runtime.models / "paths-broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.yml").write_text("module_id: not-a-module\nname: broken\n")
    with pytest.raises(RuntimeCallError) as caught:
        client.generate("paths-broken", "x")
    assert root not in caught.value.message
    client.generate(base_id, "x", max_new_tokens=1)
    status, body = get(runtime.http_port, "/info/models")
    assert status == 200 and root.encode() not in body and b"robust-base" in body


# ------------------------------------------------------ an operator's defaults


def test_listening_beyond_loopback_needs_tls_or_keys():
    import caikit

    config = caikit.get_config()
    with pytest.raises(ValueError, match="without TLS or API keys"):
        ServingSettings.from_config(config, host="0.0.0.0")
    assert ServingSettings.from_config(config, host="127.0.0.1").allowed_hosts


def test_a_second_server_on_a_taken_grpc_port_fails_instead_of_sharing_it(
    runtime, client, base_id, tmp_path, base_models_dir
):
    """gRPC's SO_REUSEPORT default would let the second server take some of the first's
    connections; the shipped config turns it off."""
    second = Runtime(
        tmp_path, base_models_dir, extra={"runtime": {"grpc": {"port": runtime.grpc_port}}}
    )
    with pytest.raises(RuntimeError, match="Failed to bind"):
        second.start(timeout=60)
    assert client.generate(base_id, "still here", max_new_tokens=2)["generated_text"] is not None


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, base_models_dir):
    """A server with API keys, small limits and a pool of four inference threads; the
    folder caikit's unix socket would use exists. Its services are named by another
    domain, set from the environment (the project's client finds them by reflection)."""
    os.makedirs("/tmp/mmesh", exist_ok=True)
    extra = {
        "runtime": {
            "server_thread_pool_size": 4,
            "auth": {"api_keys": [API_KEY]},
            "http": {"limits": {"header_timeout_seconds": 1, "body_timeout_seconds": 1}},
        }
    }
    server = Runtime(tmp_path_factory.mktemp("guarded"), base_models_dir, extra=extra)
    TextGeneration.bootstrap("tiny-llama").save(str(server.models / "base"))
    server.start(env={"RUNTIME_SERVICE_GENERATION_DOMAIN": "Tuning"})
    yield server
    server.stop()


def test_api_keys_are_required_on_both_transports(guarded):
    body = {"model_id": "base", "inputs": "x", "parameters": {"max_new_tokens": 1}}
    assert post(guarded.http_port, GENERATE, body)[0] == 401
    assert (
        post(guarded.http_port, GENERATE, body, {"Authorization": "Bearer " + "x" * 24})[0] == 401
    )
    assert post(guarded.http_port, GENERATE, body, {"Authorization": f"Bearer {API_KEY}"})[0] == 200
    assert get(guarded.http_port, "/health")[0] == 200  # probes stay open
    with pytest.raises(RuntimeCallError) as caught:
        guarded.client.generate_grpc("base", "x", max_new_tokens=1)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    keyed = RuntimeProcess.client(guarded, api_key=API_KEY)
    assert int(keyed.generate_grpc("base", "x", max_new_tokens=1)["generated_tokens"]) == 1
    assert keyed.generate("base", "x", max_new_tokens=1)["generated_tokens"] == 1


def test_the_openai_routes_need_the_key_too(guarded):
    import openai

    url = f"http://127.0.0.1:{guarded.http_port}/v1"
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=url, api_key="x" * 24, max_retries=0).models.list()
    assert "API key" in refused.value.message
    keyed = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert [model.id for model in keyed.models.list()] == ["base"]
    answer = keyed.completions.create(model="base", prompt="x", max_tokens=1, temperature=0)
    assert answer.usage.completion_tokens == 1
    with pytest.raises(openai.APIStatusError) as too_large:
        keyed.completions.create(model="base", prompt="x" * (5 * 2**20), max_tokens=1)
    assert too_large.value.status_code == 413


def test_service_names_follow_the_environment_and_the_client_follows_them(guarded):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(f"127.0.0.1:{guarded.grpc_port}")
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "caikit.runtime.Tuning.TuningService" in services
    assert not [name for name in services if ".Nlp." in name]
    client = RuntimeProcess.client(guarded, api_key=API_KEY)
    assert int(client.generate_grpc("base", "x", max_new_tokens=1)["generated_tokens"]) == 1
    with pytest.raises(RuntimeCallError) as caught:
        client.training_status("no-such-training")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_only_configured_host_names_are_answered(guarded):
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert get(guarded.http_port, "/health", {"Host": "attacker.example"})[0] == 421
    assert get(guarded.http_port, "/health", {"Host": f"localhost:{guarded.http_port}"})[0] == 200
    assert get(guarded.http_port, "/info/models", {**key, "Host": "[::1]"})[0] == 200


def test_slow_clients_are_cut_off(guarded):
    slow = []
    for head in (b"GET /health HTTP/1.1\r\nHost: loc", b""):
        sock = socket.create_connection(("127.0.0.1", guarded.http_port))
        sock.settimeout(10)
        if not head:  # the body never arrives
            head = (
                f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            ).encode()
        sock.sendall(head)
        slow.append(sock)
    started = time.monotonic()
    answers = [sock.recv(100) for sock in slow]
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
    assert time.monotonic() - started < 5


def test_no_plaintext_unix_socket_by_default(guarded):
    server = psutil.Process(guarded.process.pid)
    connections = getattr(server, "net_connections", None) or server.connections
    assert not [c for c in connections(kind="unix") if "mmesh" in str(c.laddr)]


def test_readiness_says_503_while_every_inference_thread_is_busy(guarded):
    client = RuntimeProcess.client(guarded, api_key=API_KEY)
    streams = [
        client.stream("base", "x", max_new_tokens=2000, min_new_tokens=2000) for _ in range(4)
    ]
    for stream in streams:
        next(stream)
    status, _ = get(guarded.http_port, "/health")
    for stream in streams:
        stream.close()
    assert status == 503
    deadline = time.monotonic() + 5
    while get(guarded.http_port, "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _sigterm_a_thread_other_than_main(pid: int) -> None:
    """What the kernel may do with a SIGTERM sent to the process: hand it to any
    thread. Then only a main thread that wakes by itself runs Python's handler."""
    import ctypes
    import platform

    tgkill = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    if tgkill is None:
        pytest.skip(f"no tgkill syscall number for {platform.machine()}")
    other = max(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(tgkill, pid, other, signal.SIGTERM) == 0, ctypes.get_errno()


def test_shutdown_is_bounded_whatever_the_clients_do(guarded):
    """Last in this module: it stops the server. Streams still open, others stuck
    mid-request; SIGTERM still ends the process within the shutdown timeout (5 s),
    even when it lands on a thread other than the main one."""
    request = raw_stream_request(
        guarded.http_port,
        {"model_id": "base", "inputs": "x", "parameters": {"max_new_tokens": 5000}},
    )
    request = request.replace(
        b"Host: localhost\r\n", f"Host: localhost\r\nAuthorization: Bearer {API_KEY}\r\n".encode()
    )
    sockets = []
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", guarded.http_port))
        sock.sendall(request)  # and never read: the server's writes back up
        sockets.append(sock)
    time.sleep(1.0)
    started = time.monotonic()
    _sigterm_a_thread_other_than_main(guarded.process.pid)
    guarded.process.wait(timeout=20)
    assert time.monotonic() - started < 6
    for sock in sockets:
        sock.close()
