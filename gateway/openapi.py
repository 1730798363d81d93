"""OpenAPI 3.1 description of the gateway. Request schemas come from the field tables that
validate requests (documented limits are the enforced limits), response schemas from the
response types the views serialise (a field they send cannot be missing here)."""

from __future__ import annotations

from typing import Any

from gateway.errors import ErrorBody
from gateway.fields import object_schema
from gateway.generate import B64Data, ResponseFormat, S3Data, request_fields
from gateway.limits import GenerationLimits
from gateway.moderate import ModerateData, moderate_fields
from gateway.readiness import PublicReadiness, Readiness
from gateway.schema import ref, schemas
from gateway.settings import Settings

_SPEC_EXAMPLE = {
    "prompt": "positive prompt",
    "width": 512,
    "height": 1024,
    "num_inference_steps": 15,
    "response_format": "s3",
    "upscale": "true",
    "s3_prefix": "https://prod-data.sekai.chat/aiu-character/000/1.png?AWSAccessKeyId="
    "AKIAQE43KJDN7ARTLAVM&Signature=%2ByiRa6eTIiuPtE3wGWzFzmS3snA%3D&Expires=1756921542",
    "enable_nsfw_check": "true",
}

_ERRORS = {
    "400": "Invalid request: malformed JSON, a wrong, missing or unknown field (named in "
    "`error.field`), an s3_prefix that is not an allowed http(s) URL with a file name, or "
    "enable_deepfake_check on a gateway without an NVIDIA API key.",
    "401": "No valid API key (`Authorization: Bearer <key>`), when keys are configured.",
    "413": "Body larger than GATEWAY_MAX_BODY_BYTES.",
    "415": "Body not sent as application/json.",
    "429": "Triton's queue is full, or this process already works on GATEWAY_MAX_IN_FLIGHT "
    "requests; retry after `Retry-After` seconds.",
    "502": "Inference failed upstream, or the upload failed after all retries "
    "(`error.code` upload_failed, with the `data` block: hash, score, last storage status).",
    "503": "Triton or the model is unavailable, the request waited past the inference queue's "
    "timeout, or the upload host cannot be resolved right now; retry after `Retry-After` seconds.",
    "504": "Generation did not finish within GATEWAY_TRITON_DEADLINE_S.",
}

_MODERATE_ERRORS = {
    "400": "Invalid request: a wrong, missing or unknown field (named in `error.field`); an "
    "image that is not a readable JPEG, PNG or WebP, or has more than "
    "GATEWAY_MODERATE_MAX_PIXELS pixels; enable_deepfake_check without an NVIDIA API key.",
    "413": "Image larger than GATEWAY_MODERATE_MAX_BYTES (or the body larger than its base64).",
    "415": "Body neither application/json nor multipart/form-data.",
    "429": _ERRORS["429"],
    "502": "The NSFW model failed.",
    "503": _ERRORS["503"],
    "504": "The NSFW model did not answer within GATEWAY_TRITON_DEADLINE_S.",
}


def _auth_enabled(settings: Settings) -> bool:
    return bool(settings.api_keys or settings.api_keys_file)


def build_openapi(settings: Settings, limits: GenerationLimits | None = None) -> dict[str, Any]:
    """The document; `limits` are those /generate validates with (the settings' own if None)."""
    limits = limits or GenerationLimits.from_settings(settings)
    request_schema = {
        **object_schema(request_fields(limits)),
        "description": (
            f"Unknown fields are refused (400 naming the field). width×height at most "
            f"{limits.max_pixels} pixels. s3_prefix is required when response_format is "
            '"s3" (the default) and refused otherwise; its host must be allowed by '
            "GATEWAY_UPLOAD_ALLOWED_HOSTS."
        ),
        "if": {
            "properties": {"response_format": {"const": ResponseFormat.B64_JSON.value}},
            "required": ["response_format"],
        },
        "then": {"not": {"required": ["s3_prefix"]}},
        "else": {"required": ["s3_prefix"]},
        "examples": [_SPEC_EXAMPLE],
    }
    moderate_request = object_schema(moderate_fields(settings))
    moderate_form = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {
            **moderate_request["properties"],
            "image": {
                "type": "string",
                "contentMediaType": "application/octet-stream",
                "description": "The image file (JPEG, PNG or WebP), raw bytes.",
            },
        },
    }
    responses = schemas(S3Data, B64Data, ModerateData, ErrorBody, Readiness, PublicReadiness)
    # errors.py cannot name the use case's type: the data block of upload_failed is S3Data's.
    error_data = responses["ErrorBody"]["properties"]["data"]
    responses["ErrorBody"]["properties"]["data"] = {**ref(S3Data), **error_data}
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}

    def error(description: str, status: str) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": ref(ErrorBody)}},
        }
        if status in ("429", "503"):
            response["headers"] = retry_after
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        return response

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagegen gateway",
            "version": "0.1.0",
            "description": "Text-to-image generation with NSFW scoring and upload to a "
            "presigned storage URL.",
        },
        "paths": {
            "/generate": {
                "post": {
                    "summary": "Generate an image, score it, upload it (or return it inline).",
                    # Every other path is open: probes, metrics and this document.
                    "security": [{"bearer": []}] if _auth_enabled(settings) else [],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Generated (and uploaded, for response_format s3).",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["data"],
                                        "properties": {
                                            "data": {"oneOf": [
                                                ref(S3Data),
                                                ref(B64Data),
                                            ]}
                                        },
                                    }
                                }
                            },
                        },
                        **{status: error(text, status) for status, text in _ERRORS.items()},
                    },
                }
            },
            "/moderate": {
                "post": {
                    "summary": "Score an existing image: the NSFW model and, when asked, "
                    "NVIDIA's deepfake detection.",
                    "security": [{"bearer": []}] if _auth_enabled(settings) else [],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ModerateRequest"}},
                            "multipart/form-data": {"schema": moderate_form},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Scored.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["data"],
                                        "properties": {"data": ref(ModerateData)},
                                    }
                                }
                            },
                        },
                        **{status: error(text, status) for status, text in _MODERATE_ERRORS.items()},
                    },
                }
            },
            "/healthz": {"get": {"summary": "The process is alive.",
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {
                "get": {
                    "summary": "Triton and both ensembles ready; which models (demo or real) are "
                    "loaded. Replicas, weight sources, limits and problems only with an API key.",
                    "responses": {
                        code: {
                            "description": text,
                            "content": {"application/json": {"schema": {
                                "oneOf": [ref(Readiness), ref(PublicReadiness)]
                            }}},
                        }
                        for code, text in (("200", "Ready."), ("503", "Not ready."))
                    },
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {
                "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                                      "responses": {"200": {"description": "OpenAPI 3.1."}}}},
            "/docs": {"get": {"summary": "This document in Swagger UI, with Try it out.",
                              "responses": {"200": {"description": "HTML.",
                                                    "content": {"text/html": {}}}}}},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "GATEWAY_API_KEYS"}
            },
            "schemas": {
                "GenerateRequest": request_schema,
                "ModerateRequest": moderate_request,
                **responses,
            },
        },
    }
