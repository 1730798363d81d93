"""POST /moderate: an existing image scored by the NSFW model on the session's Triton (compared
with a direct call to that model) and, when asked, by the local fake of NVIDIA's API; and every
way a client can get the upload wrong, answered with a JSON 4xx before anything leaves."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from flask.testing import FlaskClient
from PIL import Image

from export.nsfw import sample_images
from gateway import Settings
from tests.gateway.fake_nvidia import API_KEY, API_PATH, sent
from tests.gateway.faults import FaultServer
from tests.models.helpers import tensors


def encode(pixels: np.ndarray, image_format: str, **options: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format, **options)
    return out.getvalue()


def model_score(triton: Any, data: bytes) -> tuple[float, str]:
    """The nsfw model's own answer for the image, called directly (no gateway)."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        result = client.infer("nsfw", tensors(IMAGE=pixels[None]))
    finally:
        client.close()
    return float(result.as_numpy("NSFW_SCORE")[0, 0]), result.as_numpy("NSFW_STATUS")[0, 0].decode()


def as_json(data: bytes, **fields: Any) -> dict[str, Any]:
    return {"json": {"image": base64.b64encode(data).decode(), **fields}}


def as_form(data: bytes, **fields: Any) -> dict[str, Any]:
    return {
        "data": {"image": (io.BytesIO(data), "upload.bin"), **fields},
        "content_type": "multipart/form-data",
    }


IMAGES = sample_images(seed=11)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("send", [as_json, as_form], ids=["json", "multipart"])
def test_the_score_is_the_models_own(
    triton: Any, triton_client: FlaskClient, image_format: str, send: Any
) -> None:
    scores = []
    for pixels in (IMAGES[2], IMAGES[5]):  # 224×224 and 333×777
        data = encode(pixels, image_format)
        response = triton_client.post("/moderate", **send(data))
        assert response.status_code == 200, response.json
        body = response.json["data"]
        assert list(body) == ["image_hash", "nsfw_score", "nsfw", "nsfw_status"]
        assert (body["nsfw_score"], body["nsfw_status"]) == model_score(triton, data)
        assert body["image_hash"] == hashlib.md5(data).hexdigest()
        scores.append(body["nsfw_score"])
    assert scores[0] != scores[1]  # different images, different scores: equality above means something


def test_a_data_url_and_wrapped_base64_are_accepted(triton: Any, triton_client: FlaskClient) -> None:
    data = encode(IMAGES[2], "PNG")
    wrapped = base64.encodebytes(data).decode()  # 76-column lines, like the `base64` tool
    for image in (f"data:image/png;base64,{base64.b64encode(data).decode()}", wrapped):
        response = triton_client.post("/moderate", json={"image": image})
        assert response.status_code == 200, response.json
        assert response.json["data"]["nsfw_score"] == model_score(triton, data)[0]


@pytest.fixture
def deepfake_client(
    make_app: Any, triton_settings: Settings, nvidia_api: FaultServer
) -> FlaskClient:
    settings = triton_settings.replace(
        nvidia_api_url=f"{nvidia_api.url}{API_PATH}", nvidia_api_key=API_KEY, deepfake_budget_s=2.0
    )
    return make_app(settings).test_client()


@pytest.mark.parametrize(
    ("image_format", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/jpeg")]
)
def test_the_deepfake_check_gets_the_image(
    deepfake_client: FlaskClient, nvidia_api: FaultServer, image_format: str, mime: str
) -> None:
    data = encode(IMAGES[6], image_format)  # blocks: small in every format, under the API's limit
    response = deepfake_client.post("/moderate", **as_form(data, enable_deepfake_check="true"))
    assert response.status_code == 200, response.json
    body = response.json["data"]
    assert (body["deepfake_score"], body["deepfake_status"]) == (0.87, "ok")
    assert body["nsfw_status"] == "ok"
    request = sent(nvidia_api.requests[0])
    assert request.mime == mime
    assert request.authorization == f"Bearer {API_KEY}"
    if image_format == "WEBP":  # not taken by the API: sent as a JPEG of the same pixels
        with Image.open(io.BytesIO(request.image)) as reencoded:
            assert reencoded.format == "JPEG"
            difference = np.asarray(reencoded.convert("RGB")).astype(int) - np.asarray(
                Image.open(io.BytesIO(data)).convert("RGB")
            )
        # JPEG loss on hard color edges; random pixels would differ by ~100.
        assert np.abs(difference).mean() < 8
    else:
        assert request.image == data  # the bytes exactly as received


def test_metrics_count_both_signals(deepfake_client: FlaskClient) -> None:
    data = encode(IMAGES[2], "JPEG")
    deepfake_client.post("/moderate", **as_json(data, enable_deepfake_check=True))
    text = deepfake_client.get("/metrics").get_data(as_text=True)
    assert 'gateway_nsfw_checks_total{status="ok"} 1.0' in text
    assert 'gateway_deepfake_checks_total{status="ok"} 1.0' in text
    assert 'gateway_moderation_duration_seconds_count{signal="nsfw"} 1.0' in text
    assert 'gateway_moderation_duration_seconds_count{signal="deepfake"} 1.0' in text
    assert 'gateway_triton_requests_total{model="nsfw",outcome="ok"} 1.0' in text
    assert 'gateway_http_requests_total{endpoint="/moderate",method="POST",status="200"} 1.0' in text


# Everything below runs on `client`: no Triton behind it (a call would be a 503) and no API key.

SMALL = encode(np.full((16, 16, 3), 128, np.uint8), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims another size: a decompression bomb's shape."""
    data = bytearray(SMALL)
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize(
    ("request_args", "status", "code", "field"),
    [
        (as_json(b"just some text, not an image"), 400, "invalid_request", "image"),
        (as_form(b"just some text, not an image"), 400, "invalid_request", "image"),
        (as_json(encode(np.zeros((8, 8, 3), np.uint8), "GIF")), 400, "invalid_request", "image"),
        (as_json(SMALL[:60]), 400, "invalid_request", "image"),  # truncated
        (as_json(png_claiming(100_000, 100_000)), 400, "invalid_request", "image"),
        (as_form(png_claiming(5000, 4000)), 400, "invalid_request", "image"),
        ({"json": {"image": "not base64!"}}, 400, "invalid_request", "image"),
        ({"json": {"image": 42}}, 400, "invalid_request", "image"),
        ({"json": {}}, 400, "invalid_request", "image"),
        (as_json(SMALL, imagee=1), 400, "invalid_request", "imagee"),
        (as_json(SMALL, enable_deepfake_check="maybe"), 400, "invalid_request", "enable_deepfake_check"),
        # Asked for without an API key configured: refused, saying so.
        (as_json(SMALL, enable_deepfake_check=True), 400, "invalid_request", "enable_deepfake_check"),
        (as_form(SMALL, enable_deepfake_check="true"), 400, "invalid_request", "enable_deepfake_check"),
        ({"data": {"image": base64.b64encode(SMALL).decode()}, "content_type": "multipart/form-data"},
         400, "invalid_request", "image"),  # a text field, not a file part
        ({"data": {"other": (io.BytesIO(SMALL), "x.png")}, "content_type": "multipart/form-data"},
         400, "invalid_request", "other"),
        ({"data": {}, "content_type": "multipart/form-data"}, 400, "invalid_request", "image"),
        ({"data": SMALL, "content_type": "image/png"}, 415, "unsupported_media_type", None),
        # Over GATEWAY_MODERATE_MAX_BYTES (4096 here), in base64 or as a file part.
        (as_json(bytes(5000)), 413, "payload_too_large", "image"),
        (as_form(bytes(5000)), 413, "payload_too_large", "image"),
        # Over the body limit itself: refused before the body is read.
        (as_json(bytes(200_000)), 413, "payload_too_large", None),
        (as_form(bytes(200_000)), 413, "payload_too_large", None),
    ],
)
def test_bad_uploads_are_json_4xx_and_nothing_is_sent(
    make_app: Any,
    base_settings: Settings,
    request_args: dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    client = make_app(base_settings.replace(moderate_max_bytes=4096)).test_client()
    response = client.post("/moderate", **request_args)
    assert response.status_code == status, response.json
    assert response.is_json and set(response.json) == {"error"}
    assert response.json["error"]["code"] == code
    assert response.json["error"].get("field") == field


def test_the_pixel_limit_is_checked_before_decoding(client: FlaskClient) -> None:
    # Decoding would fail differently (the data holds 16×16 pixels): the header was enough.
    response = client.post("/moderate", **as_json(png_claiming(5000, 4000)))
    assert response.json["error"]["message"] == (
        "image is 5000×4000 pixels; the limit is 16777216 pixels"
    )
    # Past Pillow's own bomb guard, its refusal is ours too.
    response = client.post("/moderate", **as_json(png_claiming(100_000, 100_000)))
    assert response.json["error"]["message"] == "image has more than 16777216 pixels"


def test_a_valid_image_reaches_triton(client: FlaskClient) -> None:
    # The same client as above: with a valid image the only failure left is the dead Triton.
    response = client.post("/moderate", **as_json(SMALL))
    assert response.status_code == 503 and response.json["error"]["code"] == "unavailable"
