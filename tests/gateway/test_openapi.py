from __future__ import annotations

import jsonschema
import pytest
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from gateway import Settings
from gateway.openapi import build_openapi
from gateway.request import request_fields


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
    assert list(properties) == [f.name for f in request_fields(Settings())]
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
