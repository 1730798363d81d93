"""HTTP endpoints: thin; the work lives in request, moderation, triton, imaging, urls, storage
and deepfake."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gateway.deepfake import PendingCheck
from gateway.egress import pin
from gateway.errors import PayloadTooLarge, UploadFailed
from gateway.imaging import encode_jpeg
from gateway.logs import truncate
from gateway.moderation import body_limit, check_moderate_form, check_moderate_json
from gateway.openapi import build_openapi
from gateway.request import GenerateRequest, check_inputs, parse_body
from gateway.services import Services
from gateway.storage import UploadResult
from gateway.urls import UploadUrl, rewrite_url

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


def _start_deepfake(svc: Services, image: bytes, mime: str = "image/jpeg") -> PendingCheck:
    assert svc.deepfake is not None  # the request checks refuse the check without an API key
    return svc.deepfake.start(image, mime)


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
    with _stage(svc, "total"):
        return _generate(svc, req, s3_target)


def _generate(svc: Services, req: GenerateRequest, s3_target: UploadUrl | None) -> Any:
    settings = svc.settings
    with _stage(svc, "triton"):
        generated = svc.triton.generate(req, settings.triton_deadline_s)
    image = encode_jpeg(generated.image, settings.jpeg_quality)
    svc.metrics.stage_latency.labels("encode").observe(image.encode_seconds)
    svc.metrics.stage_latency.labels("hash").observe(image.hash_seconds)
    # Exactly the bytes that are uploaded (or returned), checked while the upload runs.
    deepfake = _start_deepfake(svc, image.data) if req.enable_deepfake_check else None

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
    svc.metrics.nsfw_checked(
        (generated.nsfw_status or "error") if req.enable_nsfw_check else None,
        generated.nsfw_score,
    )
    if deepfake is not None:
        data.update(deepfake.result().response_fields())

    fields: dict[str, str] = {}
    if settings.log_prompt_chars:  # a prompt may be long or personal: at most this much of it
        fields["prompt"] = truncate(req.prompt, settings.log_prompt_chars)
    log.info(
        "generated %dx%d (x%d) steps=%d nsfw=%s deepfake=%s format=%s hash=%s%s",
        req.width,
        req.height,
        req.scale,
        req.num_inference_steps,
        generated.nsfw_status if req.enable_nsfw_check else "off",
        data.get("deepfake_status", "off"),
        req.response_format,
        image.md5,
        f" upload={upload.status} attempts={len(upload.attempts)}" if upload else "",
        extra=fields,
    )
    if upload is not None and not upload.ok:
        # The image exists and may even be stored; the client still gets hash, score, status.
        raise UploadFailed(upload.describe(), data=data)
    return jsonify({"data": data})


@bp.post("/moderate")
def moderate() -> Any:
    svc = services()
    settings = svc.settings
    limit = body_limit(settings)
    # Images are larger than /generate's bodies: this endpoint has its own limit.
    request.max_content_length = limit
    if request.mimetype == "multipart/form-data":
        req = check_moderate_form(request.form, request.files, settings)
    else:
        req = check_moderate_json(_read_body(limit), request.content_type, settings)

    deepfake = _start_deepfake(svc, *req.api_image()) if req.enable_deepfake_check else None
    started = time.perf_counter()
    nsfw_score, nsfw_status = svc.triton.classify(req.image.pixels, settings.triton_deadline_s)
    svc.metrics.moderation_latency.labels("nsfw").observe(time.perf_counter() - started)
    svc.metrics.nsfw_checks.labels(nsfw_status).inc()
    data: dict[str, Any] = {
        "image_hash": req.md5,
        "nsfw_score": nsfw_score,
        "nsfw_status": nsfw_status,
    }
    if deepfake is not None:
        data.update(deepfake.result().response_fields())

    log.info(
        "moderated %s %dx%d nsfw=%s deepfake=%s hash=%s",
        req.image.format,
        req.image.width,
        req.image.height,
        nsfw_status,
        data.get("deepfake_status", "off"),
        data["image_hash"],
    )
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
