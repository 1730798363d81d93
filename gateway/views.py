"""HTTP endpoints: each parses the request, calls its use case, and serialises the result."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gateway.auth import api_owner, api_tenant, is_api_client
from gateway.bodies import read_body
from gateway.errors import UploadFailed
from gateway.fields import parse_body
from gateway.generate import check_inputs, generate
from gateway.idempotency import HEADER, Answer, fingerprint, parse_key, run_once
from gateway.moderate import body_limit, check_moderate_form, check_moderate_json, moderate
from gateway.openapi import build_openapi
from gateway.readiness import PublicReadiness
from gateway.schema import to_json
from gateway.services import Services

bp = Blueprint("gateway", __name__)


def services() -> Services:
    return current_app.extensions["gateway"]


@bp.post("/generate", endpoint="generate")
def generate_image() -> Any:
    svc = services()
    payload = parse_body(read_body(svc.settings.max_body_bytes), request.content_type)
    req = check_inputs(payload, svc.settings, svc.limits.current())
    key = parse_key(request.headers.get(HEADER))  # after validation: a 400 stores nothing
    # The tenant's level: an interactive tenant's caller goes ahead of batch work in Triton's
    # queue (jobs, and batch tenants' /generate).
    priority = api_tenant().priority

    def run() -> Answer:
        result = generate(svc, req, priority=priority)
        if result.upload is not None and not result.upload.ok:
            # The image exists and may even be stored; the client still gets hash, score, status.
            raise UploadFailed(result.upload.describe(), data=to_json(result.data))
        return 200, {"data": to_json(result.data)}, {}

    if key is None:
        status, body, headers = run()
    else:
        status, body, headers = run_once(
            svc.store.idempotency if svc.store else None,
            (api_owner(), request.path),
            key,
            fingerprint(payload),
            run,
            counted=svc.metrics.idempotency,
        )
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


@bp.post("/moderate", endpoint="moderate")
def moderate_image() -> Any:
    svc = services()
    limit = body_limit(svc.settings)
    # Images are larger than /generate's bodies: this endpoint has its own limit.
    request.max_content_length = limit
    if request.mimetype == "multipart/form-data":
        boundary = request.mimetype_params.get("boundary")
        req = check_moderate_form(request.stream, boundary, svc.settings)
    else:
        req = check_moderate_json(read_body(limit), request.content_type, svc.settings)
    return jsonify({"data": to_json(moderate(svc, req).data)})


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Any:
    svc = services()
    state = current_app.extensions["gateway_readiness"].current()
    response = jsonify(to_json(state if is_api_client() else PublicReadiness.of(state)))
    response.status_code = 200 if state.ready else 503
    if not state.ready:
        response.headers["Retry-After"] = str(svc.settings.retry_after_s)
    return response


@bp.get("/metrics")
def metrics() -> Response:
    svc = services()
    queue = current_app.extensions["gateway_queue_reading"].current() if svc.store else None
    return Response(svc.metrics.render(queue), content_type=svc.metrics.content_type)


@bp.get("/openapi.json")
def openapi() -> Any:
    svc = services()
    return jsonify(build_openapi(svc.settings, svc.limits.current()))
