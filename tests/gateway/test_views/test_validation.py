"""Everything a client can get wrong is a JSON 4xx naming the field, and nothing leaves the
gateway: no Triton call (the app's Triton address is a dead port, so a call would be 503) and
no upload (the fault server must see no request)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.gateway.faults import FaultServer


def valid(fault_server: FaultServer, **fields: Any) -> dict[str, Any]:
    return {
        "prompt": "positive prompt",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "s3_prefix": f"{fault_server.url}/aiu-character/000/1.png?Signature=%2Bx%3D",
        **fields,
    }


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"negative_prompt": ["no"]}, "negative_prompt"),
    ({"width": "wide"}, "width"),
    ({"width": 100}, "width"),
    ({"width": 4096}, "width"),
    ({"width": -64}, "width"),
    ({"width": 64.5}, "width"),
    ({"width": True}, "width"),
    ({"width": 10**30}, "width"),
    ({"height": [64]}, "height"),
    ({"height": 8}, "height"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 1000}, "num_inference_steps"),
    ({"num_inference_steps": "ten"}, "num_inference_steps"),
    ({"response_format": "url"}, "response_format"),
    ({"response_format": "b64_json"}, "s3_prefix"),  # s3_prefix given but unused
    ({"upscale": "yes"}, "upscale"),
    ({"upscale": 2}, "upscale"),
    ({"enable_nsfw_check": "maybe"}, "enable_nsfw_check"),
    ({"enable_nsfw_chek": True}, "enable_nsfw_chek"),
    ({"Prompt": "x"}, "Prompt"),
    ({"seed": -5}, "seed"),
    ({"seed": "lucky"}, "seed"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"guidance_scale": 1000}, "guidance_scale"),
    ({"s3_prefix": None}, "s3_prefix"),
    ({"s3_prefix": ""}, "s3_prefix"),
    ({"s3_prefix": 42}, "s3_prefix"),
    ({"s3_prefix": "not a url"}, "s3_prefix"),
    ({"s3_prefix": "ftp://127.0.0.1/1.png"}, "s3_prefix"),
    ({"s3_prefix": "http://127.0.0.1:1/"}, "s3_prefix"),
    ({"s3_prefix": "http://169.254.169.254/latest/meta-data/x"}, "s3_prefix"),
    ({"s3_prefix": "https://prod-data.sekai.chat/aiu-character/000/1.png?Signature=x"}, "s3_prefix"),
]


@pytest.mark.parametrize(("fields", "name"), INVALID, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID)])
def test_every_invalid_field_is_a_400_naming_it_and_nothing_is_sent(
    client: FlaskClient, fault_server: FaultServer, fields: dict[str, Any], name: str
) -> None:
    body = valid(fault_server, **fields)
    if fields.get("prompt", "") is None:
        body.pop("prompt")
    response = client.post("/generate", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == name
    assert name in error["message"]
    assert fault_server.requests == []


def test_a_wrong_field_with_a_port_outside_the_allowlist(client: FlaskClient, fault_server: FaultServer) -> None:
    body = valid(fault_server, s3_prefix=f"http://127.0.0.1:{fault_server.port + 1}/b/1.png")
    response = client.post("/generate", json=body)
    assert response.status_code == 400 and response.json["error"]["field"] == "s3_prefix"
    assert fault_server.requests == []


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"", "application/json", 400),
        (b"{not json", "application/json", 400),
        (b'{"prompt": "\xff"}', "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b"null", "application/json", 400),
        (b"[" * 20000 + b"]" * 20000, "application/json", 400),
        (b'{"prompt": "x", "prompt": "y"}', "application/json", 400),
        (b'{"width": NaN}', "application/json", 400),
        (b'{"prompt": "x"}', "text/plain", 415),
        (b"prompt=x", "application/x-www-form-urlencoded", 415),
        (b'{"prompt": "x"}', None, 415),
    ],
)
def test_malformed_bodies_get_json_errors(
    client: FlaskClient, fault_server: FaultServer, data: bytes, content_type: str | None, status: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/generate", data=data, headers=headers)
    assert response.status_code == status
    assert response.is_json and set(response.json) == {"error"}
    assert response.json["error"]["code"] in ("invalid_request", "unsupported_media_type")
    assert fault_server.requests == []


def test_a_body_over_the_limit_is_413(client: FlaskClient, fault_server: FaultServer) -> None:
    body = b'{"prompt": "' + b"x" * 70000 + b'"}'
    response = client.post("/generate", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert fault_server.requests == []


def test_a_chunked_body_over_the_limit_is_413(client: FlaskClient) -> None:
    # No Content-Length: the limit must hold while reading, as under gunicorn with chunked input.
    body = io.BytesIO(b'{"prompt": "' + b"x" * 100_000 + b'"}')
    response = client.post(
        "/generate",
        input_stream=body,
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413


def test_triton_unreachable_is_503_json_with_retry_after(client: FlaskClient, fault_server: FaultServer) -> None:
    response = client.post("/generate", json=valid(fault_server))
    assert response.status_code == 503
    assert response.json["error"]["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert fault_server.requests == []


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/generate", 405, "method_not_allowed"),
        ("DELETE", "/readyz", 405, "method_not_allowed"),
    ],
)
def test_flask_errors_use_the_same_shape(client: FlaskClient, method: str, path: str, status: int, code: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == status
    assert response.json == {"error": {"code": code, "message": response.json["error"]["message"]}}


def test_an_unexpected_exception_is_a_json_500_without_details(make_app, base_settings) -> None:  # type: ignore[no-untyped-def]
    app = make_app(base_settings)
    app.config["TESTING"] = False  # let the error handler run instead of propagating

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.json == {"error": {"code": "internal_error", "message": "internal error"}}


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok"}
