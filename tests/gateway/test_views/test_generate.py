"""POST /generate end to end: the session's real Triton (demo models), the local S3 (moto) and
the scripted fault server. Images are small (64-128 px, 2 steps) except in the spec's example."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import ipaddress
import logging
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from gateway import Settings
from tests.gateway.conftest import LocalS3
from tests.gateway.faults import HANG, FaultServer, Respond
from tests.gateway.upload.test_egress import Pki
from tests.models.helpers import diffusion_held, diffusion_idle, executions

SPEC_QUERY = "?AWSAccessKeyId=AKIAQE43KJDN7ARTLAVM&Signature=%2ByiRa6eTIiuPtE3wGWzFzmS3snA%3D&Expires=1756921542"


def small(**fields: Any) -> dict[str, Any]:
    return {
        "prompt": "a red bicycle",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "upscale": False,
        "enable_nsfw_check": False,
        **fields,
    }


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


def nsfw_executions(triton: Any, at_least: int = 0) -> int:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        return executions(client, "nsfw", at_least=at_least)


def test_the_specs_example_request(make_app: Any, triton_settings: Settings, s3: LocalS3) -> None:
    """The spec's request, field for field and value for value (512×1024, 15 steps, upscale and
    NSFW as the strings "true"), with its SigV2 s3_prefix shape pointed at the local S3."""
    # The full-size generation takes what the machine's load makes it: the deadline only stops
    # a test that would hang.
    client = make_app(triton_settings.replace(triton_deadline_s=600.0)).test_client()
    s3_prefix = s3.presign_put("000/1.png", signature_version="s3")
    assert s3_prefix.startswith(f"{s3.url}/aiu-character/000/1.png?AWSAccessKeyId=")
    response = client.post(
        "/generate",
        json={
            "prompt": "positive prompt",
            "width": 512,
            "height": 1024,
            "num_inference_steps": 15,
            "response_format": "s3",
            "upscale": "true",
            "s3_prefix": s3_prefix,
            "enable_nsfw_check": "true",
        },
    )
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert list(response.json) == ["data"]
    assert list(data) == ["s3_url", "nsfw_score", "image_hash", "s3_upload_status", "nsfw",
                          "nsfw_status"]
    image_hash = data["image_hash"]
    assert len(image_hash) == 32 and int(image_hash, 16) >= 0
    assert data["s3_url"] == s3_prefix.replace("/1.png?", f"/{image_hash}.jpg?")
    assert data["s3_upload_status"] == 200
    assert isinstance(data["nsfw_score"], float) and 0.0 <= data["nsfw_score"] <= 1.0
    assert data["nsfw_status"] == "ok"

    stored = s3.get(f"000/{image_hash}.jpg")
    assert hashlib.md5(stored).hexdigest() == image_hash
    assert jpeg_size(stored) == (1024, 2048)  # 2× the requested 512×1024
    with urllib.request.urlopen(data["s3_url"]) as resp:  # the returned URL serves the object
        assert resp.read() == stored


@pytest.mark.parametrize(("upscale", "scale"), [(True, 2), (False, 1), ("FALSE", 1)])
def test_the_image_has_the_requested_size(
    triton_client: FlaskClient, s3: LocalS3, upscale: Any, scale: int
) -> None:
    url = s3.presign_put(f"sizes/{scale}/1.png")
    response = triton_client.post("/generate", json=small(width=128, height=64, upscale=upscale, s3_prefix=url))
    assert response.status_code == 200, response.json
    stored = s3.get(f"sizes/{scale}/{response.json['data']['image_hash']}.jpg")
    assert jpeg_size(stored) == (128 * scale, 64 * scale)


@pytest.mark.parametrize(
    "query",
    [
        SPEC_QUERY,
        (
            "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20250903%2Fus-east-1%2Fs3%2F"
            "aws4_request&X-Amz-Date=20250903T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            "&X-Amz-Signature=ab12"
        ),
    ],
    ids=["sigv2", "sigv4"],
)
def test_the_query_reaches_storage_byte_for_byte(
    triton_client: FlaskClient, fault_server: FaultServer, query: str
) -> None:
    response = triton_client.post(
        "/generate", json=small(s3_prefix=f"{fault_server.url}/aiu-character/000/1.png{query}")
    )
    assert response.status_code == 200, response.json
    image_hash = response.json["data"]["image_hash"]
    [received] = fault_server.requests
    assert received.target == f"/aiu-character/000/{image_hash}.jpg{query}"
    assert hashlib.md5(received.body).hexdigest() == image_hash
    assert "Content-Type" not in received.headers
    assert response.json["data"]["s3_url"] == f"{fault_server.url}/aiu-character/000/{image_hash}.jpg{query}"


def test_a_boto3_sigv4_url_is_kept_byte_for_byte(triton_client: FlaskClient, s3: LocalS3) -> None:
    url = s3.presign_put("sigv4/1.png")
    response = triton_client.post("/generate", json=small(s3_prefix=url))
    assert response.status_code == 200, response.json
    data = response.json["data"]
    prefix, query = url.split("?", 1)
    assert data["s3_url"] == f"{prefix[: -len('1.png')]}{data['image_hash']}.jpg?{query}"
    assert hashlib.md5(s3.get(f"sigv4/{data['image_hash']}.jpg")).hexdigest() == data["image_hash"]


def test_keep_naming_puts_to_the_url_as_given(
    make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    client = make_app(triton_settings.replace(upload_naming="keep")).test_client()
    url = f"{fault_server.url}/aiu-character/000/1.png{SPEC_QUERY}"
    response = client.post("/generate", json=small(s3_prefix=url))
    assert response.status_code == 200
    assert response.json["data"]["s3_url"] == url
    assert fault_server.requests[0].target == f"/aiu-character/000/1.png{SPEC_QUERY}"


def test_nsfw_off_never_runs_the_classifier(
    triton: Any, triton_client: FlaskClient, fault_server: FaultServer
) -> None:
    before = nsfw_executions(triton)
    response = triton_client.post(
        "/generate", json=small(enable_nsfw_check="false", s3_prefix=f"{fault_server.url}/b/1.png")
    )
    assert response.status_code == 200
    data = response.json["data"]
    assert data["nsfw_score"] is None and "nsfw_status" not in data
    assert nsfw_executions(triton) == before

    # The same statistic does move when the check is on, so the assertion above can fail.
    response = triton_client.post(
        "/generate", json=small(enable_nsfw_check=True, s3_prefix=f"{fault_server.url}/b/1.png")
    )
    assert response.json["data"]["nsfw_status"] == "ok"
    assert 0.0 <= response.json["data"]["nsfw_score"] <= 1.0
    assert nsfw_executions(triton, at_least=before + 1) == before + 1


def test_b64_json_returns_the_jpeg_inline_and_uploads_nothing(
    triton_client: FlaskClient, fault_server: FaultServer
) -> None:
    response = triton_client.post(
        "/generate", json=small(response_format="b64_json", enable_nsfw_check=True, upscale=True)
    )
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert set(data) == {"b64_json", "nsfw_score", "image_hash", "nsfw", "nsfw_status"}
    jpeg = base64.b64decode(data["b64_json"], validate=True)
    assert hashlib.md5(jpeg).hexdigest() == data["image_hash"]
    assert jpeg_size(jpeg) == (128, 128)
    assert fault_server.requests == []


def test_a_seed_makes_the_image_repeatable(triton_client: FlaskClient) -> None:
    body = small(response_format="b64_json", seed=1234, negative_prompt="blurry", guidance_scale=5)
    first = triton_client.post("/generate", json=body).json["data"]["image_hash"]
    second = triton_client.post("/generate", json=body).json["data"]["image_hash"]
    other = triton_client.post("/generate", json={**body, "seed": 4321}).json["data"]["image_hash"]
    assert first == second != other


def test_503_503_200_is_retried_to_success(triton_client: FlaskClient, fault_server: FaultServer) -> None:
    fault_server.set_script(503, 503, 200)
    response = triton_client.post("/generate", json=small(s3_prefix=f"{fault_server.url}/b/1.png"))
    assert response.status_code == 200
    assert response.json["data"]["s3_upload_status"] == 200
    assert len(fault_server.requests) == 3
    assert len({r.body for r in fault_server.requests}) == 1  # the same bytes every time


def test_503_every_time_is_a_502_with_the_data_block(
    triton_client: FlaskClient, fault_server: FaultServer
) -> None:
    fault_server.set_script(503)
    response = triton_client.post(
        "/generate", json=small(enable_nsfw_check=True, s3_prefix=f"{fault_server.url}/b/1.png{SPEC_QUERY}")
    )
    assert response.status_code == 502
    assert response.json["error"]["code"] == "upload_failed"
    assert "4 attempts" in response.json["error"]["message"]
    data = response.json["data"]
    assert data["s3_upload_status"] == 503
    assert data["image_hash"] == hashlib.md5(fault_server.requests[0].body).hexdigest()
    assert 0.0 <= data["nsfw_score"] <= 1.0 and data["nsfw_status"] == "ok"
    assert len(fault_server.requests) == 4


def test_403_is_not_retried(triton_client: FlaskClient, fault_server: FaultServer) -> None:
    fault_server.set_script(Respond(403, body=b"<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    response = triton_client.post("/generate", json=small(s3_prefix=f"{fault_server.url}/b/1.png"))
    assert response.status_code == 502
    assert response.json["data"]["s3_upload_status"] == 403
    assert "SignatureDoesNotMatch" in response.json["error"]["message"]
    assert len(fault_server.requests) == 1


def test_connection_refused_is_retried_then_reported(
    make_app: Any, triton_settings: Settings, closed_port: int
) -> None:
    settings = triton_settings.replace(upload_allowed_hosts=(f"http://127.0.0.1:{closed_port}",))
    response = make_app(settings).test_client().post(
        "/generate", json=small(s3_prefix=f"http://127.0.0.1:{closed_port}/b/1.png")
    )
    assert response.status_code == 502
    assert response.json["data"]["s3_upload_status"] is None
    assert "4 attempts" in response.json["error"]["message"]


def test_a_storage_that_never_answers_is_retried_then_reported(
    make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    fault_server.set_script(HANG)
    client = make_app(triton_settings.replace(upload_timeout_s=0.3)).test_client()
    response = client.post("/generate", json=small(s3_prefix=f"{fault_server.url}/b/1.png"))
    assert response.status_code == 502
    assert response.json["data"]["s3_upload_status"] is None
    assert len(fault_server.requests) == 4


def loopback_tls(pki: Pki) -> ssl.SSLContext:
    """A server context for 127.0.0.1 (listed as an IP literal, the way loopback storage may be
    allowed), its certificate signed by `pki`'s CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(pki.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(pki.key, hashes.SHA256())
    )
    cert_file, key_file = pki.directory / "loopback.pem", pki.directory / "loopback.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.mark.parametrize("bundle", [True, False], ids=["with-bundle", "without"])
def test_https_storage_is_trusted_through_the_ca_bundle(
    make_app: Any, triton_settings: Settings, tmp_path: Path, bundle: bool
) -> None:
    """Storage on https with a certificate from a CA of its own: GATEWAY_UPLOAD_CA_BUNDLE
    naming that CA makes the upload go through; without it the certificate is refused, nothing
    is sent, and the answer is the documented 502 (outcome tls_error)."""
    pki = Pki(tmp_path)
    storage = FaultServer(tls=loopback_tls(pki)).start()
    try:
        url = f"https://127.0.0.1:{storage.port}/b/1.png"
        settings = triton_settings.replace(
            upload_allowed_hosts=(f"https://127.0.0.1:{storage.port}",),
            upload_ca_bundle=str(pki.ca_file) if bundle else None,
        )
        client = make_app(settings).test_client()
        response = client.post("/generate", json=small(s3_prefix=url))
        metrics = client.get("/metrics").get_data(as_text=True)
    finally:
        storage.stop()
    if bundle:
        assert response.status_code == 200, response.json
        data = response.json["data"]
        assert data["s3_upload_status"] == 200
        [received] = storage.requests
        assert received.target == f"/b/{data['image_hash']}.jpg"
        assert hashlib.md5(received.body).hexdigest() == data["image_hash"]
    else:
        assert response.status_code == 502, response.json
        assert response.json["error"]["code"] == "upload_failed"
        assert response.json["data"]["s3_upload_status"] is None
        assert storage.requests == []
        assert 'gateway_upload_attempts_total{outcome="tls_error"} 1.0' in metrics


def test_a_generation_past_the_deadline_is_504(
    make_app: Any, triton_settings: Settings, triton: Any
) -> None:
    client = make_app(triton_settings.replace(triton_deadline_s=0.5)).test_client()
    # The model is held busy: the deadline passes before the generation can end, on any machine.
    with diffusion_held(triton):
        response = client.post("/generate", json=small(response_format="b64_json"))
    diffusion_idle(triton)  # the request Triton still held has run (its timeout_ms stops it)
    assert response.status_code == 504
    assert response.json["error"]["code"] == "deadline_exceeded"


def test_signatures_stay_out_of_logs_and_metrics(
    triton_client: FlaskClient, fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    fault_server.set_script(503)
    with caplog.at_level(logging.DEBUG):
        triton_client.post("/generate", json=small(s3_prefix=f"{fault_server.url}/b/1.png{SPEC_QUERY}"))
    metrics = triton_client.get("/metrics").get_data(as_text=True)
    for secret in ("AKIAQE43KJDN7ARTLAVM", "yiRa6eTIiuPtE3wGWzFzmS3snA", "Signature"):
        assert secret not in caplog.text
        assert secret not in metrics
    assert "upload attempt" in caplog.text  # the failures were logged, redacted
    assert 'gateway_uploads_total{result="failure",status_class="5xx"} 1.0' in metrics
    assert 'gateway_upload_attempts_total{outcome="http_5xx"} 4.0' in metrics


def test_metrics_count_requests_and_nsfw_outcomes(triton_client: FlaskClient, fault_server: FaultServer) -> None:
    triton_client.post("/generate", json=small(enable_nsfw_check=True, s3_prefix=f"{fault_server.url}/b/1.png"))
    triton_client.post("/generate", json={"prompt": "x", "bogus": 1})
    text = triton_client.get("/metrics").get_data(as_text=True)
    assert 'gateway_http_requests_total{endpoint="/generate",method="POST",status="200"} 1.0' in text
    assert 'gateway_http_requests_total{endpoint="/generate",method="POST",status="400"} 1.0' in text
    assert 'gateway_nsfw_checks_total{status="ok"} 1.0' in text
    assert 'gateway_triton_requests_total{model="txt2img_nsfw",outcome="ok"} 1.0' in text
    assert 'gateway_uploads_total{result="success",status_class="2xx"} 1.0' in text
    assert "a red bicycle" not in text


def test_concurrent_requests_are_all_answered(
    triton_client: FlaskClient, make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    app: Flask = make_app(triton_settings)

    def one(i: int) -> int:
        with app.test_client() as client:
            body = small(seed=i, s3_prefix=f"{fault_server.url}/c/{i}/1.png")
            return client.post("/generate", json=body).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [200] * 4
    assert sorted(r.target.split("/")[2] for r in fault_server.requests) == ["0", "1", "2", "3"]
