from __future__ import annotations

import json
import re

import jsonschema
import pytest
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from gateway import Settings
from gateway.generate import request_fields
from gateway.limits import GenerationLimits
from gateway.openapi import build_openapi
from gateway.tenants.quotas import POLICY, WINDOW_S


@pytest.fixture
def document(client: FlaskClient) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json


def test_it_is_a_valid_openapi_3_1_document(document: dict) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_request_field_is_described_with_its_default(document: dict) -> None:
    schema = document["components"]["schemas"]["GenerateRequest"]
    properties = schema["properties"]
    assert list(properties) == [f.name for f in request_fields(GenerationLimits.from_settings(Settings()))]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["prompt"]
    defaults = {name: prop.get("default") for name, prop in properties.items()}
    assert defaults["width"] == 512 and defaults["height"] == 1024
    assert defaults["num_inference_steps"] == 15 and defaults["response_format"] == "s3"
    assert defaults["upscale"] is True and defaults["enable_nsfw_check"] is True
    assert all(prop.get("description") for prop in properties.values())


def test_ranges_follow_the_settings() -> None:
    doc = build_openapi(Settings(max_size=1024, max_steps=50))
    props = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    width = next(v for v in props["width"]["anyOf"] if v.get("type") == "integer")
    steps = next(v for v in props["num_inference_steps"]["anyOf"] if v.get("type") == "integer")
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 1024, 8)
    assert (steps["minimum"], steps["maximum"]) == (1, 50)


def test_every_error_status_is_documented(document: dict) -> None:
    responses = document["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "413", "415", "429", "502", "503", "504"} <= set(responses)
    assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
    assert {"/healthz", "/readyz", "/metrics", "/openapi.json"} <= set(document["paths"])


def test_the_request_schema_agrees_with_the_validator(document: dict) -> None:
    schema = {**document["components"]["schemas"]["GenerateRequest"]}
    ok = schema["examples"][0]  # the spec's example
    jsonschema.validate(ok, schema)
    for bad in ({**ok, "enable_nsfw_chek": True}, {**ok, "width": 100}, {"prompt": "x"},
                {**ok, "upscale": "yes"}, {**ok, "response_format": "b64_json"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_the_deepfake_check_is_documented(document: dict) -> None:
    schemas = document["components"]["schemas"]
    check = schemas["GenerateRequest"]["properties"]["enable_deepfake_check"]
    assert check["default"] is False and "API key" in check["description"]
    for name in ("S3Data", "B64Data", "ModerateData"):
        status = schemas[name]["properties"]["deepfake_status"]
        assert status["enum"] == ["ok", "no_face", "content_filtered", "too_large", "timeout", "error"]
        assert "deepfake_score" not in schemas[name].get("required", [])


def test_moderate_is_documented_and_its_schema_agrees_with_the_validator(document: dict) -> None:
    post = document["paths"]["/moderate"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "400", "413", "415", "503"} <= set(post["responses"])
    schema = document["components"]["schemas"]["ModerateRequest"]
    assert list(schema["properties"]) == ["image", "enable_deepfake_check"]
    jsonschema.validate({"image": "iVBORw0KGgo=", "enable_deepfake_check": "true"}, schema)
    for bad in ({}, {"image": ""}, {"image": "x", "enable_deepfake_chek": True}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# --- tenants' quotas -----------------------------------------------------------------------------

LIMITED = ("/generate", "/jobs")


def _header(document: dict, header: dict) -> dict:
    if "$ref" in header:
        return document["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
    return header


def test_the_rate_limited_endpoints_describe_both_quota_codes(document: dict) -> None:
    generate = document["paths"]["/generate"]["post"]["responses"]["429"]["description"]
    jobs = document["paths"]["/jobs"]["post"]["responses"]["429"]["description"]
    for text in (generate, jobs):
        assert "rate_limited" in text and "concurrency_limited" in text
    assert "overloaded" in generate  # the process's own bound is still a 429 of /generate
    assert "GATEWAY_QUOTA_FAIL_OPEN" in document["paths"]["/generate"]["post"]["responses"]["503"]["description"]


def test_the_ratelimit_fields_are_on_the_answers_of_limited_endpoints(document: dict) -> None:
    # Counted before the body is read: every answer but 401 (no tenant yet) carries them.
    answers = [(path, status, response) for path in LIMITED
               for status, response in document["paths"][path]["post"]["responses"].items()]
    assert {"200", "202", "400", "429"} <= {status for _, status, _ in answers}
    for path, status, response in answers:
        headers = response.get("headers", {})
        if status == "401":
            assert "RateLimit" not in headers
            continue
        assert {"RateLimit", "RateLimit-Policy"} <= set(headers), (path, status)
        for name in ("RateLimit", "RateLimit-Policy"):
            assert _header(document, headers[name])["schema"] == {"type": "string"}
        if status == "429":
            assert _header(document, headers["Retry-After"])["schema"] == {"type": "integer"}
    # Only where a tenant's rate limit applies: not /moderate, nor reading a job.
    assert "RateLimit" not in document["paths"]["/moderate"]["post"]["responses"]["429"]["headers"]
    assert "headers" not in document["paths"]["/jobs/{job_id}"]["get"]["responses"]["200"]


def test_the_ratelimit_examples_follow_the_draft_s_syntax(document: dict) -> None:
    # draft-ietf-httpapi-ratelimit-headers: a list of items, each a quoted policy name with
    # integer parameters: q (quota) and w (window) for the policy, r (remaining) and t (reset).
    headers = document["components"]["headers"]
    item = r'"[a-z0-9-]+"(;[a-z]=\d+)+'
    policy = headers["RateLimit-Policy"]["example"]
    state = headers["RateLimit"]["example"]
    assert re.fullmatch(item, policy) and re.fullmatch(item, state)
    assert policy == f'"{POLICY}";q=120;w={WINDOW_S}'  # the gateway's own policy and window
    assert [p.split("=")[0] for p in policy.split(";")[1:]] == ["q", "w"]
    assert [p.split("=")[0] for p in state.split(";")[1:]] == ["r", "t"]
    assert policy.split(";")[0] == state.split(";")[0]  # the same policy's state


def test_the_document_with_keys_validates_too() -> None:
    document = build_openapi(Settings(api_keys=("docs-example-key-0000",)))
    assert document["paths"]["/generate"]["post"]["security"] == [{"bearer": []}]
    validate(json.loads(json.dumps(document)))
