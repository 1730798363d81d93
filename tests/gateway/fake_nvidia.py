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
import json
import re
from dataclasses import dataclass
from typing import Any

from tests.gateway.faults import Received, Respond

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
