"""OpenAPI 3.1 description of the gateway, built from the same field table that validates
requests, so documented limits are the enforced limits (they come from the settings)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.deepfake import STATUSES as DEEPFAKE_STATUSES
from gateway.moderation import moderate_fields
from gateway.request import FieldSpec, request_fields
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


def _variants(spec: FieldSpec) -> list[dict[str, Any]]:
    if spec.kind == "string":
        string: dict[str, Any] = {"type": "string"}
        if spec.max_length is not None:
            string["maxLength"] = spec.max_length
        if spec.required:
            string["minLength"] = 1
        return [string]
    if spec.kind == "enum":
        return [{"type": "string", "enum": list(spec.enum)}]
    if spec.kind == "boolean":
        return [
            {"type": "boolean"},
            {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$"},
        ]
    number: dict[str, Any] = {"type": "integer" if spec.kind == "integer" else "number"}
    if spec.minimum is not None:
        number["minimum"] = spec.minimum
    if spec.maximum is not None:
        number["maximum"] = spec.maximum
    if spec.multiple_of:
        number["multipleOf"] = spec.multiple_of
    # Strings are range-checked too, after conversion; JSON Schema cannot say so.
    pattern = "^[0-9]{1,18}$" if spec.kind == "integer" else r"^[0-9]{1,6}(\.[0-9]{1,6})?$"
    return [number, {"type": "string", "pattern": pattern}]


def _field_schema(spec: FieldSpec) -> dict[str, Any]:
    variants = _variants(spec)
    if not spec.required:
        variants.append({"type": "null"})  # null means "not given", like leaving it out
    schema: dict[str, Any] = {"anyOf": variants} if len(variants) > 1 else dict(variants[0])
    schema["description"] = spec.description
    if spec.has_default:
        schema["default"] = spec.default
    return schema


def _auth_enabled(settings: Settings) -> bool:
    return bool(settings.api_keys or settings.api_keys_file)


def _object_schema(fields: Sequence[FieldSpec]) -> dict[str, Any]:
    """A JSON body of exactly these fields: unknown ones are refused, as the parsers do."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [f.name for f in fields if f.required],
        "properties": {f.name: _field_schema(f) for f in fields},
    }


def build_openapi(settings: Settings) -> dict[str, Any]:
    request_schema = {
        **_object_schema(request_fields(settings)),
        "description": (
            f"Unknown fields are refused (400 naming the field). width×height at most "
            f"{settings.max_pixels} pixels. s3_prefix is required when response_format is "
            '"s3" (the default) and refused otherwise; its host must be allowed by '
            "GATEWAY_UPLOAD_ALLOWED_HOSTS."
        ),
        "if": {
            "properties": {"response_format": {"const": "b64_json"}},
            "required": ["response_format"],
        },
        "then": {"not": {"required": ["s3_prefix"]}},
        "else": {"required": ["s3_prefix"]},
        "examples": [_SPEC_EXAMPLE],
    }
    nsfw_score = {
        "type": ["number", "null"],
        "minimum": 0,
        "maximum": 1,
        "description": "Probability of the label nsfw; 1.0 when the check timed out (5 s budget) "
        "or failed; null when enable_nsfw_check is false.",
    }
    nsfw_status = {
        "type": "string",
        "enum": ["ok", "timeout", "error"],
        "description": "Present only when the check ran.",
    }
    image_hash = {
        "type": "string",
        "pattern": "^[0-9a-f]{32}$",
        "description": "MD5 (hex) of exactly the JPEG bytes uploaded or returned.",
    }
    deepfake_score = {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "Highest is_deepfake over all faces (NVIDIA's deepfake detection); 0.0 "
        "with no_face; 1.0 with every other status but ok. Present only when "
        "enable_deepfake_check is true.",
    }
    deepfake_status = {
        "type": "string",
        "enum": list(DEEPFAKE_STATUSES),
        "description": "too_large: not sent (over GATEWAY_DEEPFAKE_MAX_IMAGE_BYTES); timeout: "
        "past GATEWAY_DEEPFAKE_BUDGET_S. Present only when enable_deepfake_check is true.",
    }
    s3_data = {
        "type": "object",
        "required": ["s3_url", "nsfw_score", "image_hash", "s3_upload_status"],
        "properties": {
            "s3_url": {
                "type": "string",
                "description": "s3_prefix with its file name replaced by {image_hash}.jpg "
                "(GATEWAY_UPLOAD_NAMING=rewrite) or as given (keep); query kept byte for byte.",
            },
            "nsfw_score": nsfw_score,
            "image_hash": image_hash,
            "s3_upload_status": {
                "type": ["integer", "null"],
                "description": "Last HTTP status from storage; null when it never answered.",
            },
            "nsfw_status": nsfw_status,
            "deepfake_score": deepfake_score,
            "deepfake_status": deepfake_status,
        },
    }
    b64_data = {
        "type": "object",
        "required": ["b64_json", "nsfw_score", "image_hash"],
        "properties": {
            "b64_json": {"type": "string", "contentEncoding": "base64",
                         "contentMediaType": "image/jpeg"},
            "nsfw_score": nsfw_score,
            "image_hash": image_hash,
            "nsfw_status": nsfw_status,
            "deepfake_score": deepfake_score,
            "deepfake_status": deepfake_status,
        },
    }
    moderate_request = _object_schema(moderate_fields(settings))
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
    moderate_data = {
        "type": "object",
        "required": ["image_hash", "nsfw_score", "nsfw_status"],
        "properties": {
            "image_hash": {**image_hash, "description": "MD5 (hex) of the image as received."},
            "nsfw_score": {**nsfw_score, "type": "number"},
            "nsfw_status": {**nsfw_status, "description": "The NSFW model's status."},
            "deepfake_score": deepfake_score,
            "deepfake_status": deepfake_status,
        },
    }
    error_schema = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string", "description": "The request field at fault."},
                },
            },
            "data": {**s3_data, "description": "Only with upload_failed."},
        },
    }
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}

    def error(description: str, status: str) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if status in ("429", "503"):
            response["headers"] = retry_after
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        return response

    readiness = {
        "type": "object",
        "properties": {
            "status": {"enum": ["ready", "not_ready"]},
            "triton": {"type": "object"},
            "models": {"type": "object", "description": "Ensembles and whether each is ready."},
            "loaded": {
                "type": "object",
                "description": "Per model: kind, source, demo (from Triton's imagegen_model_info).",
            },
            "demo": {
                "type": ["boolean", "null"],
                "description": "True when any model runs random demo weights; null if unknown.",
            },
            "problems": {"type": "array", "items": {"type": "string"}},
        },
    }
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
                                                {"$ref": "#/components/schemas/S3Data"},
                                                {"$ref": "#/components/schemas/B64Data"},
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
                                        "properties": {"data": {"$ref": "#/components/schemas/ModerateData"}},
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
                    "summary": "Triton and both ensembles ready; which models (demo or real) are loaded.",
                    "responses": {
                        code: {
                            "description": text,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}},
                        }
                        for code, text in (("200", "Ready."), ("503", "Not ready."))
                    },
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {
                "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                                      "responses": {"200": {"description": "OpenAPI 3.1."}}}},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "GATEWAY_API_KEYS"}
            },
            "schemas": {
                "GenerateRequest": request_schema,
                "S3Data": s3_data,
                "B64Data": b64_data,
                "ModerateRequest": moderate_request,
                "ModerateData": moderate_data,
                "Error": error_schema,
                "Readiness": readiness,
            }
        },
    }
