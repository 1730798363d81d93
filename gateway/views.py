"""HTTP endpoints: thin; the work lives in request, triton, imaging, urls and storage."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gateway.egress import pin
from gateway.errors import PayloadTooLarge, UploadFailed
from gateway.imaging import encode_jpeg
from gateway.logs import truncate
from gateway.openapi import build_openapi
from gateway.request import check_inputs, parse_body
from gateway.services import Services
from gateway.storage import UploadResult
from gateway.urls import rewrite_url

log = logging.getLogger(__name__)

bp = Blueprint("gateway", __name__)


def services() -> Services:
    return current_app.extensions["gateway"]


@contextmanager
def _stage(svc: Services, name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        svc.metrics.stage_latency.labels(name).observe(time.perf_counter() - started)


def _read_body(limit: int) -> bytes:
    # A Content-Length over the limit is refused by Werkzeug before reading; a chunked body
    # is silently cut at the limit instead, which would surface as a confusing JSON error.
    data = request.get_data(cache=False)
    if request.content_length is None and len(data) >= limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    return data


@bp.post("/generate")
def generate() -> Any:
    svc = services()
    settings = svc.settings
    payload = parse_body(_read_body(settings.max_body_bytes), request.content_type)
    req = check_inputs(payload, settings)
    # Resolved and checked once, before any GPU time is spent; the upload connects only there.
    s3_target = (
        pin(req.s3_target, retry_after_s=settings.retry_after_s)
        if req.s3_target is not None
        else None
    )

    with _stage(svc, "triton"):
        generated = svc.triton.generate(req, settings.triton_deadline_s)
    with _stage(svc, "encode"):
        image = encode_jpeg(generated.image, settings.jpeg_quality)

    data: dict[str, Any]
    upload: UploadResult | None = None
    if req.response_format == "b64_json":
        data = {
            "b64_json": base64.b64encode(image.data).decode("ascii"),
            "nsfw_score": generated.nsfw_score,
            "image_hash": image.md5,
        }
    else:
        assert s3_target is not None  # check_inputs guarantees it for "s3"
        target = rewrite_url(s3_target, image.md5, settings.upload_naming)
        with _stage(svc, "upload"):
            upload = svc.uploader.put(target, image.data, image.md5)
        data = {
            "s3_url": target.url,
            "nsfw_score": generated.nsfw_score,
            "image_hash": image.md5,
            "s3_upload_status": upload.status,
        }
    if req.enable_nsfw_check:
        data["nsfw_status"] = generated.nsfw_status
        svc.metrics.nsfw_checks.labels(generated.nsfw_status or "error").inc()

    fields: dict[str, str] = {}
    if settings.log_prompt_chars:  # a prompt may be long or personal: at most this much of it
        fields["prompt"] = truncate(req.prompt, settings.log_prompt_chars)
    log.info(
        "generated %dx%d (x%d) steps=%d nsfw=%s format=%s hash=%s%s",
        req.width,
        req.height,
        req.scale,
        req.num_inference_steps,
        generated.nsfw_status if req.enable_nsfw_check else "off",
        req.response_format,
        image.md5,
        f" upload={upload.status} attempts={len(upload.attempts)}" if upload else "",
        extra=fields,
    )
    if upload is not None and not upload.ok:
        # The image exists and may even be stored; the client still gets hash, score, status.
        raise UploadFailed(upload.describe(), data=data)
    return jsonify({"data": data})


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Any:
    svc = services()
    state = svc.triton.readiness()
    response = jsonify(state.body(svc.settings.triton_url))
    response.status_code = 200 if state.ready else 503
    if not state.ready:
        response.headers["Retry-After"] = str(svc.settings.retry_after_s)
    return response


@bp.get("/metrics")
def metrics() -> Response:
    svc = services()
    return Response(svc.metrics.render(), content_type=svc.metrics.content_type)


@bp.get("/openapi.json")
def openapi() -> Any:
    return jsonify(build_openapi(services().settings))
