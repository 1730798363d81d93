"""OpenAPI 3.1 description of the gateway. Request schemas come from the field tables that
validate requests (documented limits are the enforced limits), response schemas from the
response types the views serialise (a field they send cannot be missing here)."""

from __future__ import annotations

import copy
from typing import Any

from gateway.errors import ErrorBody, ErrorDetail
from gateway.fields import object_schema
from gateway.generate import MAX_URL_CHARS, B64Data, ResponseFormat, S3Data, request_fields
from gateway.idempotency import HEADER as IDEMPOTENCY_KEY
from gateway.idempotency import REPLAYED_HEADER
from gateway.jobs.job import ID_PATTERN, JobObject
from gateway.jobs.webhooks import FIELD as WEBHOOK
from gateway.limits import GenerationLimits
from gateway.moderate import ModerateData, moderate_fields
from gateway.readiness import PublicReadiness, Readiness
from gateway.schema import ref, schemas
from gateway.settings import Settings
from gateway.tenants.quotas import POLICY, WINDOW_S

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

_OVERLOADED = (
    "Triton's queue is full, or this process already works on GATEWAY_MAX_IN_FLIGHT requests"
)

_ERRORS = {
    "400": "Invalid request: malformed JSON, a wrong, missing or unknown field (named in "
    "`error.field`), an s3_prefix that is not an allowed http(s) URL with a file name, or "
    "enable_deepfake_check on a gateway without an NVIDIA API key.",
    "401": "No valid API key (`Authorization: Bearer <key>`), when keys are configured.",
    "413": "Body larger than GATEWAY_MAX_BODY_BYTES.",
    "415": "Body not sent as application/json.",
    "429": f"{_OVERLOADED} (`error.code` overloaded); retry after `Retry-After` seconds.",
    "502": "Inference failed upstream, or the upload failed after all retries "
    "(`error.code` upload_failed, with the `data` block: hash, score, last storage status).",
    "503": "Triton or the model is unavailable, the request waited past the inference queue's "
    "timeout, or the upload host cannot be resolved right now; retry after `Retry-After` seconds.",
    "504": "Generation did not finish within GATEWAY_TRITON_DEADLINE_S.",
}

# A tenant's quotas (gateway.tenants): POST /generate and POST /jobs share requests_per_minute.
_RATE_LIMITED = (
    "`error.code` rate_limited: the tenant's requests_per_minute (POST /generate and POST /jobs "
    "together, counted by every gateway) is spent; `Retry-After` is the seconds until one more "
    "fits (`RateLimit`'s `t`)."
)
_GENERATE_429 = (
    f"{_RATE_LIMITED} `error.code` concurrency_limited: the tenant already has max_concurrent "
    "generations in flight (synchronous ones and running jobs, on every gateway and worker). "
    f"`error.code` overloaded: {_OVERLOADED}. Retry after `Retry-After` seconds."
)
_JOBS_429 = (
    f"{_RATE_LIMITED} A job is never refused for max_concurrent (`error.code` "
    "concurrency_limited is /generate's): it waits in its tenant's queue until a running job of "
    "the tenant ends."
)
_QUOTAS_UNREACHABLE = (
    "With GATEWAY_QUOTA_FAIL_OPEN=false, also while the quotas' store (Redis) cannot be "
    "reached (with true, the default, the request is admitted unchecked)."
)
# draft-ietf-httpapi-ratelimit-headers: the quota policy and what is left of it.
_RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {
        "description": "The tenant's rate limit, on every answer but 401 to a tenant with a "
        f"requests_per_minute: `\"{POLICY}\";q=<requests_per_minute>;w={WINDOW_S}` (a "
        "Structured Field list, per the IETF httpapi RateLimit header fields draft).",
        "schema": {"type": "string"},
        "example": f'"{POLICY}";q=120;w={WINDOW_S}',
    },
    "RateLimit": {
        "description": f"What is left of it: `\"{POLICY}\";r=<requests remaining>;t=<seconds "
        "until the oldest counted request leaves the window>`.",
        "schema": {"type": "string"},
        "example": f'"{POLICY}";r=0;t=12',
    },
}

_IDEMPOTENCY_ERRORS = {
    "409": f"A request with this {IDEMPOTENCY_KEY} is still in progress "
    "(`error.code` idempotency_key_in_use); retry after `Retry-After` seconds.",
    "422": f"This {IDEMPOTENCY_KEY} was used with another body "
    "(`error.code` idempotency_key_mismatch).",
}

_JOB_ERRORS = {
    "400": "Invalid request: anything /generate refuses, response_format b64_json (jobs deliver "
    "to storage), or a webhook that is not an allowed https URL (or no webhook secret is "
    "configured). Nothing is queued.",
    "401": _ERRORS["401"],
    "413": _ERRORS["413"],
    "415": _ERRORS["415"],
    **_IDEMPOTENCY_ERRORS,
    "429": _JOBS_429,
    "503": "The job store (Redis) is unavailable or not configured; retry after `Retry-After` "
    "seconds.",
}

_JOB_READ_ERRORS = {
    "401": _ERRORS["401"],
    "404": "No such job: an unknown id, one of another API key, or one past its TTL "
    "(GATEWAY_JOB_TTL_S).",
    "503": _JOB_ERRORS["503"],
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
    responses = schemas(
        S3Data, B64Data, ModerateData, ErrorBody, Readiness, PublicReadiness, JobObject
    )
    # errors.py cannot name the use case's type: the data block of upload_failed is S3Data's.
    error_data = responses["ErrorBody"]["properties"]["data"]
    responses["ErrorBody"]["properties"]["data"] = {**ref(S3Data), **error_data}
    # Nor can the job's module: its data is /generate's, its error the error object.
    job = responses["JobObject"]["properties"]
    job["data"] = {"oneOf": [ref(S3Data), {"type": "null"}], **job["data"]}
    job["error"] = {"oneOf": [ref(ErrorDetail), {"type": "null"}], **job["error"]}
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    security = [{"bearer": []}] if _auth_enabled(settings) else []
    idempotency_key = {
        "name": IDEMPOTENCY_KEY,
        "in": "header",
        "required": False,
        "description": "Makes a retry safe (IETF httpapi draft): the same key with the same "
        "body, by the same API key, to the same path, within GATEWAY_IDEMPOTENCY_TTL_S, gets "
        "the first answer again (and `Idempotent-Replayed: true`) without a second generation. "
        'A Structured Field string (`"..."`) or a bare token, 1-255 printable ASCII characters.',
        "schema": {"type": "string", "maxLength": 257},
    }
    replayed = {
        REPLAYED_HEADER: {
            "schema": {"type": "string", "const": "true"},
            "description": f"Present when this is the stored answer of an earlier request with "
            f"the same {IDEMPOTENCY_KEY}.",
        }
    }
    job_content = {"application/json": {"schema": ref(JobObject)}}
    job_id = {
        "name": "job_id", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": ID_PATTERN},
    }

    rate_limit = {name: {"$ref": f"#/components/headers/{name}"} for name in _RATE_LIMIT_HEADERS}

    def error(description: str, status: str, *, limited: bool = False) -> dict[str, Any]:
        """`limited`: an endpoint under the tenants' rate limit, whose answers carry its
        fields."""
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": ref(ErrorBody)}},
        }
        if status in ("409", "429", "503"):
            response["headers"] = retry_after
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        elif limited:  # counted before the body is read: every answer after the key's check
            response["headers"] = {**response.get("headers", {}), **rate_limit}
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
                    "security": security,
                    "parameters": [idempotency_key],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Generated (and uploaded, for response_format s3).",
                            "headers": {**replayed, **rate_limit},
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
                        **{
                            status: error(text, status, limited=True)
                            for status, text in {
                                **_ERRORS,
                                "429": _GENERATE_429,
                                "503": f"{_ERRORS['503']} {_QUOTAS_UNREACHABLE}",
                                **_IDEMPOTENCY_ERRORS,
                            }.items()
                        },
                    },
                }
            },
            "/jobs": {
                "post": {
                    "summary": "Queue a generation: the /generate body, plus an optional "
                    "webhook told when the job ends. Answers at once (202) unless "
                    "`Prefer: wait=N` asks to hold the answer until it ends.",
                    "security": security,
                    "parameters": [
                        idempotency_key,
                        {
                            "name": "Prefer",
                            "in": "header",
                            "required": False,
                            "description": "RFC 7240 `wait=N`: hold the answer up to N seconds "
                            f"(at most GATEWAY_JOB_MAX_WAIT_S, {settings.job_max_wait_s:g} "
                            "here) for the job to end.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Prefer: wait was applied and the job ended in time.",
                            "headers": {
                                "Preference-Applied": {"schema": {"type": "string"}},
                                "Location": {"schema": {"type": "string"}},
                                **replayed,
                                **rate_limit,
                            },
                            "content": job_content,
                        },
                        "202": {
                            "description": "Queued (or still running after the wait).",
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "/jobs/{id}",
                                },
                                "Preference-Applied": {"schema": {"type": "string"}},
                                **replayed,
                                **rate_limit,
                            },
                            "content": job_content,
                        },
                        **{
                            status: error(text, status, limited=True)
                            for status, text in _JOB_ERRORS.items()
                        },
                    },
                }
            },
            "/jobs/{job_id}": {
                "get": {
                    "summary": "The job: its status and, once it ended, its data or error.",
                    "security": security,
                    "parameters": [job_id],
                    "responses": {
                        "200": {"description": "The job.", "content": job_content},
                        **{
                            status: error(text, status)
                            for status, text in _JOB_READ_ERRORS.items()
                        },
                    },
                }
            },
            "/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel: a queued job never runs, a running one stops inside "
                    "Triton and ends canceled; a finished one is answered unchanged.",
                    "security": security,
                    "parameters": [job_id],
                    "responses": {
                        "200": {
                            "description": "The job as it is now (a running one may still "
                            "show running until its worker has stopped it).",
                            "content": job_content,
                        },
                        **{
                            status: error(text, status)
                            for status, text in _JOB_READ_ERRORS.items()
                        },
                    },
                }
            },
            "/moderate": {
                "post": {
                    "summary": "Score an existing image: the NSFW model and, when asked, "
                    "NVIDIA's deepfake detection.",
                    "security": security,
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
            "headers": copy.deepcopy(_RATE_LIMIT_HEADERS),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "GATEWAY_API_KEYS"}
            },
            "schemas": {
                "GenerateRequest": request_schema,
                "JobRequest": _job_request(request_schema),
                "ModerateRequest": moderate_request,
                **responses,
            },
        },
    }


def _job_request(generate: dict[str, Any]) -> dict[str, Any]:
    """/generate's request, response_format s3 only, plus `webhook`."""
    schema = copy.deepcopy(generate)
    for key in ("if", "then", "else", "examples"):
        schema.pop(key, None)
    schema["required"] = [*schema["required"], "s3_prefix"]
    formats = schema["properties"]["response_format"]
    formats["anyOf"] = [{"type": "string", "enum": [ResponseFormat.S3.value]}, {"type": "null"}]
    formats["description"] = "Only \"s3\": a job delivers its image to storage."
    schema["properties"][WEBHOOK] = {
        "type": "string",
        "format": "uri",
        "maxLength": MAX_URL_CHARS,
        "description": "Receives the job object when the job ends, signed per Standard "
        "Webhooks v1 (headers webhook-id, webhook-timestamp, webhook-signature; secrets "
        "GATEWAY_WEBHOOK_SECRETS). https only, unless a GATEWAY_WEBHOOK_ALLOWED_HOSTS entry "
        "names http:// for the host; hosts outside that allowlist (when set) are refused.",
    }
    schema["description"] = (
        "The /generate body (response_format s3 only), plus an optional webhook. Unknown "
        "fields are refused (400 naming the field); nothing is queued for a refused request."
    )
    schema["examples"] = [{**_SPEC_EXAMPLE, WEBHOOK: "https://hooks.example.com/imagegen"}]
    return schema
