"""TLS for gRPC and HTTP from the runtime config, with a self-signed certificate."""

import datetime
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from caikit_tuning.runtime.client import RuntimeCallError, TuningClient

from .conftest import Runtime


def self_signed(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(pem)
    return pem


@pytest.fixture(scope="module")
def tls_runtime(tmp_path_factory, base_models_dir):
    root = tmp_path_factory.mktemp("tls")
    pem = self_signed(root)
    tls = {
        "runtime": {
            "tls": {"server": {"key": str(root / "key.pem"), "cert": str(root / "cert.pem")}}
        }
    }
    server = Runtime(root, base_models_dir, extra=tls, ca_certificate=pem).start()
    from caikit_tuning import TextGeneration

    TextGeneration.bootstrap("tiny-llama").save(str(server.models / "base"))
    yield server
    server.stop()


def test_grpc_and_https_work_with_the_certificate(tls_runtime):
    client = tls_runtime.client
    over_https = client.generate("base", "the film is", max_new_tokens=3, min_new_tokens=3)
    over_grpc = client.generate_grpc("base", "the film is", max_new_tokens=3, min_new_tokens=3)
    assert over_https["generated_text"] == over_grpc["generated_text"]


def test_plaintext_is_refused(tls_runtime):
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://localhost:{tls_runtime.http_port}/health", timeout=5)
    insecure = TuningClient(f"localhost:{tls_runtime.grpc_port}", "http://unused")
    with pytest.raises(RuntimeCallError) as caught:
        insecure.generate_grpc("base", "x", max_new_tokens=1)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
