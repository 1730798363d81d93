"""A local stand-in for NVIDIA's hosted deepfake-image-detection API, which these machines
cannot reach: the scripted `FaultServer` (records every request; HANG, CLOSE and plain statuses
as usual) answering in the documented shapes.

Request: `POST /v1/cv/hive/deepfake-image-detection`, `Authorization: Bearer <key>`, JSON
`{"input": ["data:image/jpeg;base64,…"], "return_image": false}`. Answer (200):
`{"data": [{"index": 0, "status": "SUCCESS" | "ERROR" | "CONTENT_FILTERED",
"bounding_boxes": [{"vertices": [{"x", "y"}, …], "bbox_confidence": c, "is_deepfake": p}, …]}]}`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from harness.httpserver import BackgroundHTTPServer
from tests.gateway.faults import CLOSE, HANG, Action, Received, Respond

API_PATH = "/v1/cv/hive/deepfake-image-detection"
API_KEY = "nvapi-TEST-k3y-0123456789abcdef"


def answer(status: str, boxes: list[dict[str, Any]], **item: Any) -> Respond:
    body = {"data": [{"index": 0, "status": status, "bounding_boxes": boxes, **item}]}
    return json_response(body)


def json_response(body: Any, status: int = 200) -> Respond:
    return Respond(
        status,
        headers=(("Content-Type", "application/json"),),
        body=json.dumps(body).encode(),
        etag=None,
    )


def box(is_deepfake: Any, left: int = 10) -> dict[str, Any]:
    return {
        "vertices": [{"x": left, "y": 20}, {"x": left + 90, "y": 140}],
        "bbox_confidence": 0.98,
        "is_deepfake": is_deepfake,
    }


def faces(*probabilities: float) -> Respond:
    """A SUCCESS answer with one face per probability, in the order given."""
    return answer("SUCCESS", [box(p, left=10 + 100 * i) for i, p in enumerate(probabilities)])


NO_FACE = faces()
CONTENT_FILTERED = answer("CONTENT_FILTERED", [])
API_ERROR = answer("ERROR", [])


@dataclass(frozen=True)
class Sent:
    mime: str
    image: bytes
    authorization: str
    content_type: str


def sent(received: Received) -> Sent:
    """What one request carried, checked against the documented request shape."""
    assert (received.method, received.target) == ("POST", API_PATH)
    body = json.loads(received.body)
    assert body["return_image"] is False and set(body) == {"input", "return_image"}
    [item] = body["input"]
    match = re.fullmatch(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/]*={0,2})", item)
    assert match, item[:60]
    return Sent(
        mime=match[1],
        image=base64.b64decode(match[2], validate=True),
        authorization=received.headers["Authorization"],
        content_type=received.headers["Content-Type"],
    )


# NVCF's asset flow (NVCF user guide, "Asset Management"), served by `FakeNvcf`.
ASSETS_PATH = "/v2/nvcf/assets"
UPLOAD_PATH = "/s3/nvcf-assets/"  # where its presigned upload URLs point
NORMAL = "normal"  # a script action: behave as documented
EXPIRED = "expired"  # an upload action: answer 200 but keep nothing (the asset cannot be fetched)
STEPS = ("create", "upload", "detect", "delete")


def problem(status: int, detail: str) -> Respond:
    """NVCF's error shape (RFC 7807 problem details)."""
    return json_response(
        {"type": "urn:nvcf-worker-service:problem-details:bad-request", "title": "Bad Request",
         "status": status, "detail": detail},
        status,
    )


@dataclass
class StoredAsset:
    content_type: str
    description: str
    signature: str
    data: bytes | None = None


@dataclass
class FakeNvcf(BackgroundHTTPServer):
    """NVIDIA's deepfake API with NVCF's asset flow, both as documented:

    - `POST /v2/nvcf/assets` `{"contentType", "description"}` (bearer key) ->
      `{"assetId", "uploadUrl", "contentType", "description"}`;
    - `PUT` to the presigned `uploadUrl` (no key; `Content-Type` and
      `x-amz-meta-nvcf-asset-description` as declared, or S3's 403 SignatureDoesNotMatch);
    - `POST /v1/cv/hive/deepfake-image-detection` with `data:<mime>;base64,…` or
      `data:<mime>;asset_id,<id>` plus `NVCF-INPUT-ASSET-REFERENCES: <id>`: `verdict` for a
      readable JPEG or PNG, a 400 problem when the asset cannot be fetched;
    - `DELETE /v2/nvcf/assets/<id>` -> 204.

    Each step has a script like FaultServer's (an int status, a `Respond`, HANG, CLOSE, NORMAL;
    EXPIRED for uploads), the last action repeating; every request is recorded with its step.
    """

    host: str = "127.0.0.1"
    verdict: Respond = field(default_factory=lambda: faces(0.87))
    scripts: dict[str, list[Action]] = field(default_factory=dict)
    requests: list[tuple[str, Received]] = field(default_factory=list)
    assets: dict[str, StoredAsset] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._taken = {step: 0 for step in STEPS}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received = Received(
                    self.command, self.path, dict(self.headers.items()),
                    self.rfile.read(length) if length else b"", time.monotonic(),
                )
                step = fake._step(received)
                action = fake._next(step) if step else NORMAL
                if action == HANG:
                    fake._released.wait(60)
                    self.close_connection = True
                    return
                if action == CLOSE:
                    self.close_connection = True
                    return
                reply = fake._answer(step, received, action)
                if reply.delay_s:
                    fake._released.wait(reply.delay_s)
                self.send_response(reply.status)
                if reply.etag is not None and 200 <= reply.status < 300:
                    self.send_header("ETag", f'"{hashlib.md5(received.body).hexdigest()}"')
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_PUT = do_POST = do_DELETE = do_GET = _handle

        self._listen(Handler)

    def set_script(self, step: str, *actions: Action) -> None:
        with self._lock:
            self.scripts[step] = list(actions)
            self._taken[step] = 0

    def sent(self, step: str) -> list[Received]:
        return [r for s, r in self.requests if s == step]

    def stop(self) -> None:
        self._released.set()
        super().stop()

    def _step(self, received: Received) -> str | None:
        path = received.target.split("?", 1)[0]
        if received.method == "POST" and path == ASSETS_PATH:
            step = "create"
        elif received.method == "PUT" and path.startswith(UPLOAD_PATH):
            step = "upload"
        elif received.method == "POST" and path == API_PATH:
            step = "detect"
        elif received.method == "DELETE" and path.startswith(f"{ASSETS_PATH}/"):
            step = "delete"
        else:
            step = None
        with self._lock:
            self.requests.append((step or "unknown", received))
        return step

    def _next(self, step: str) -> Action:
        with self._lock:
            script = self.scripts.get(step) or [NORMAL]
            action = script[min(self._taken[step], len(script) - 1)]
            self._taken[step] += 1
            return action

    def _answer(self, step: str | None, received: Received, action: Action) -> Respond:
        if action not in (NORMAL, EXPIRED):
            return action if isinstance(action, Respond) else Respond(int(action), etag=None)
        if step is None:
            return problem(404, "no such path")
        if step != "upload" and received.headers.get("Authorization") != f"Bearer {API_KEY}":
            return problem(401, "invalid key")
        return {"create": self._create, "upload": self._upload, "detect": self._detect,
                "delete": self._delete}[step](received, action)

    def _create(self, received: Received, action: Action) -> Respond:
        try:
            body = json.loads(received.body)
            content_type, description = body["contentType"], body["description"]
        except (ValueError, KeyError, TypeError):
            return problem(400, "contentType and description are required")
        asset_id, signature = str(uuid.uuid4()), uuid.uuid4().hex
        with self._lock:
            self.assets[asset_id] = StoredAsset(content_type, description, signature)
        upload_url = (f"{self.url}{UPLOAD_PATH}{asset_id}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                      f"&X-Amz-Expires=3600&X-Amz-Signature={signature}")
        return json_response({"assetId": asset_id, "uploadUrl": upload_url,
                              "contentType": content_type, "description": description})

    def _upload(self, received: Received, action: Action) -> Respond:
        path, _, query = received.target.partition("?")
        asset = self.assets.get(path.removeprefix(UPLOAD_PATH))
        signed = asset is not None and f"X-Amz-Signature={asset.signature}" in query.split("&")
        headers = {k.lower(): v for k, v in received.headers.items()}
        if (
            asset is None
            or not signed
            or "authorization" in headers  # a presigned URL takes no other credential
            or headers.get("content-type") != asset.content_type
            or headers.get("x-amz-meta-nvcf-asset-description") != asset.description
        ):
            return Respond(403, body=b"<Error><Code>SignatureDoesNotMatch</Code></Error>",
                           etag=None)
        if action != EXPIRED:
            asset.data = received.body
        return Respond(200)

    def _detect(self, received: Received, action: Action) -> Respond:
        body = json.loads(received.body)
        [item] = body["input"]
        inline = re.fullmatch(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/]*={0,2})", item)
        by_asset = re.fullmatch(r"data:(image/[a-z]+);asset_id,([0-9a-f-]+)", item)
        if inline:
            image = base64.b64decode(inline[2])
        elif by_asset:
            references = received.headers.get("NVCF-INPUT-ASSET-REFERENCES", "").split(",")
            asset = self.assets.get(by_asset[2])
            if by_asset[2] not in references or asset is None or asset.data is None:
                return problem(400, f"asset {by_asset[2]} cannot be fetched")
            image = asset.data
        else:
            return problem(400, "input is not a data URL")
        if not image.startswith((b"\xff\xd8", b"\x89PNG")):
            return problem(422, "input is not a JPEG or PNG image")
        return self.verdict

    def _delete(self, received: Received, action: Action) -> Respond:
        with self._lock:
            found = self.assets.pop(received.target.removeprefix(f"{ASSETS_PATH}/"), None)
        return Respond(204, etag=None) if found else problem(404, "no such asset")
