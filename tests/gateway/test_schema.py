"""Response bodies and the OpenAPI document come from the same types (gateway/schema.py): every
field a view can send is documented, and a fully populated body of each type validates against
the served document."""

from __future__ import annotations

import dataclasses
from typing import Any

import jsonschema
import pytest
import referencing
from flask.testing import FlaskClient

from gateway.errors import ErrorBody, ErrorDetail
from gateway.generate import B64Data, S3Data
from gateway.jobs.job import JobObject, JobUrls
from gateway.limits import GenerationLimits
from gateway.moderate import ModerateData
from gateway.nvidia.deepfake import DeepfakeStatus
from gateway.readiness import (
    ModelState,
    Readiness,
    ReadinessStatus,
    ReplicaReadiness,
    StoreStatus,
    TritonState,
)
from gateway.schema import described, schemas, to_json
from gateway.settings import Settings
from gateway.triton.contract import NsfwStatus
from gateway.vocabulary import JobStatus

HASH = "d41d8cd98f00b204e9800998ecf8427e"
SCORES = {"nsfw_score": 0.1, "image_hash": HASH, "nsfw": False, "nsfw_status": NsfwStatus.OK,
          "deepfake_score": 0.9, "deepfake_status": DeepfakeStatus.OK}
# One body of each type the views serialise, every optional field set.
FULL = [
    S3Data(s3_url="https://s.test/b/x.jpg?Signature=1", s3_upload_status=200, **SCORES),
    B64Data(b64_json="/9j/", **SCORES),
    ModerateData(HASH, 0.2, True, NsfwStatus.TIMEOUT, 1.0, DeepfakeStatus.TOO_LARGE),
    ErrorBody(ErrorDetail("upload_failed", "upload failed", "s3_prefix"),
              to_json(S3Data(s3_url="u", s3_upload_status=None, **SCORES))),
    Readiness(ReadinessStatus.READY,
              TritonState("127.0.0.1:8001", True, True,
                          [ReplicaReadiness("127.0.0.1:8001", True, False, False, "a problem")]),
              {"txt2img": ModelState(True)}, {"diffusion": {"kind": "X", "demo": "true"}}, True,
              GenerationLimits.from_settings(Settings()), ["a problem"], StoreStatus.UP),
    # A job that failed its upload: both data and error are set.
    JobObject("job_" + "A" * 32, "storefront", JobStatus.FAILED, "2026-12-02T10:00:00.000Z",
              "2026-12-02T10:00:01.000Z", "2026-12-02T10:00:09.000Z",
              to_json(S3Data(s3_url="u", s3_upload_status=500, **SCORES)),
              to_json(ErrorDetail("upload_failed", "upload failed", None)),
              JobUrls("/jobs/job_x", "/jobs/job_x/cancel")),
]


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    return client.get("/openapi.json").json  # type: ignore[no-any-return]


@pytest.mark.parametrize("body", FULL, ids=lambda b: type(b).__name__)
def test_every_field_of_every_response_type_is_in_the_document(
    document: dict[str, Any], body: Any
) -> None:
    component = document["components"]["schemas"][type(body).__name__]
    fields = [f.name for f in dataclasses.fields(body)]
    assert list(component["properties"]) == fields
    assert component["additionalProperties"] is False  # nothing undocumented can pass either


@pytest.mark.parametrize("body", FULL, ids=lambda b: type(b).__name__)
def test_a_full_body_validates_against_the_served_document(
    document: dict[str, Any], body: Any
) -> None:
    resource = referencing.Resource.from_contents(
        document, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource("urn:doc", resource)
    schema = {"$ref": f"urn:doc#/components/schemas/{type(body).__name__}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(to_json(body))
    with pytest.raises(jsonschema.ValidationError):  # and the schema is not a blank cheque
        bad = {**to_json(body), "undocumented": 1}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(bad)


def test_none_is_left_out_or_sent_as_null_as_each_field_says() -> None:
    body = to_json(S3Data(s3_url="u", nsfw_score=None, image_hash=HASH, s3_upload_status=None,
                          nsfw=None, nsfw_status=None, deepfake_score=None, deepfake_status=None))
    assert body == {"s3_url": "u", "nsfw_score": None, "image_hash": HASH,
                    "s3_upload_status": None, "nsfw": None}


def test_a_field_added_to_a_response_type_appears_in_its_schema() -> None:
    @dataclasses.dataclass(frozen=True)
    class Grown(B64Data):
        seed_used: int | None = described("The seed.", omit_none=True, minimum=0)

    schema = schemas(Grown)["Grown"]
    assert schema["properties"]["seed_used"] == {"type": "integer", "minimum": 0,
                                                 "description": "The seed."}
    assert "seed_used" not in schema["required"]
