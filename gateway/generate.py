"""The /generate use case: its fields, `check_inputs`, and `generate`, the steps in order.

    req = check_inputs(payload, settings, limits)  # typed, or InvalidRequest naming the field
    result = generate(services, req)               # GenerateResult: response data and upload

The view only parses, calls these two and serialises; the same two serve any other caller.
"""

from __future__ import annotations

import base64
import enum
import logging
import threading
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.fields import FieldSpec, check_fields
from gateway.imaging import EncodedImage, encode_jpeg
from gateway.limits import GenerationLimits
from gateway.logs import truncate
from gateway.nvidia import deepfake
from gateway.nvidia.deepfake import deepfake_unavailable
from gateway.schema import described
from gateway.services import Services
from gateway.settings import Settings
from gateway.triton import contract
from gateway.triton.contract import NsfwStatus
from gateway.upload.egress import pin
from gateway.upload.uploader import UploadResult
from gateway.upload.urls import AllowedUrl, check_upload_url, rewrite_url
from gateway.vocabulary import DeepfakeStatus

log = logging.getLogger(__name__)

MAX_URL_CHARS = 8192  # s3_prefix, and a job's webhook
_MAX_SEED = 2**63 - 1


class ResponseFormat(str, enum.Enum):
    S3 = "s3"  # PUT the JPEG to s3_prefix, return its URL
    B64_JSON = "b64_json"  # return the JPEG inline, upload nothing


def request_fields(limits: GenerationLimits) -> tuple[FieldSpec, ...]:
    """The request fields in the order they are checked (also the OpenAPI schema)."""
    return (
        FieldSpec(
            "prompt", "string", "Positive prompt.", required=True,
            max_length=limits.max_prompt_chars,
        ),
        FieldSpec(
            "negative_prompt", "string",
            "Negative prompt (the spec's open question); empty or absent means none.",
            default=contract.NO_NEGATIVE_PROMPT, max_length=limits.max_prompt_chars,
        ),
        FieldSpec(
            "width", "integer",
            "Generated width in pixels (before upscaling). JSON integer or digit string.",
            default=512, minimum=limits.min_size, maximum=limits.max_size, multiple_of=8,
        ),
        FieldSpec(
            "height", "integer",
            "Generated height in pixels (before upscaling). JSON integer or digit string.",
            default=1024, minimum=limits.min_size, maximum=limits.max_size, multiple_of=8,
        ),
        FieldSpec(
            "num_inference_steps", "integer", "Denoising steps. JSON integer or digit string.",
            default=15, minimum=1, maximum=limits.max_steps,
        ),
        FieldSpec(
            "response_format", "enum",
            '"s3": PUT the JPEG to `s3_prefix` and return its URL; '
            '"b64_json": return the JPEG inline, base64-encoded, and upload nothing.',
            default=ResponseFormat.S3.value, enum=tuple(f.value for f in ResponseFormat),
        ),
        FieldSpec(
            "upscale", "boolean",
            'Return a 2× image. JSON boolean or "true"/"false" (any case).', default=True,
        ),
        FieldSpec(
            "s3_prefix", "string",
            "Complete presigned http(s) PUT URL; required when response_format is \"s3\" and "
            "not allowed otherwise. Its file name (e.g. `1.png`) is a placeholder replaced by "
            "`{image_hash}.jpg`; everything else is kept byte for byte.",
            max_length=MAX_URL_CHARS,
        ),
        FieldSpec(
            "enable_nsfw_check", "boolean",
            'Score the image with the NSFW classifier. JSON boolean or "true"/"false".',
            default=True,
        ),
        FieldSpec(
            "enable_deepfake_check", "boolean",
            "Also send the JPEG to NVIDIA's deepfake detection, concurrently with the upload; "
            "refused when the gateway has no API key. JSON boolean or \"true\"/\"false\".",
            default=False,
        ),
        FieldSpec(
            "seed", "integer", "Random seed; absent means random. JSON integer or digit string.",
            minimum=0, maximum=_MAX_SEED,
        ),
        FieldSpec(
            "guidance_scale", "number",
            "Classifier-free guidance scale; absent means the model's default.",
            minimum=0, maximum=limits.max_guidance_scale,
        ),
    )


@dataclass(frozen=True)
class UploadTo:
    """response_format "s3": PUT the JPEG to this URL (the allowlist let it through; its host is
    resolved and checked in the first step of `generate`)."""

    url: AllowedUrl


@dataclass(frozen=True)
class Inline:
    """response_format "b64_json": the JPEG goes back in the response; nothing is uploaded."""


Output = UploadTo | Inline


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    upscale: bool
    enable_nsfw_check: bool
    enable_deepfake_check: bool
    seed: int | None
    guidance_scale: float | None
    output: Output

    @property
    def response_format(self) -> ResponseFormat:
        return ResponseFormat.S3 if isinstance(self.output, UploadTo) else ResponseFormat.B64_JSON

    @property
    def scale(self) -> int:
        return contract.UPSCALE_FACTOR if self.upscale else 1

    def generation(self) -> contract.Generation:
        return contract.Generation(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            steps=self.num_inference_steps,
            seed=self.seed,
            guidance_scale=self.guidance_scale,
            scale=self.scale,
        )


def check_inputs(
    payload: Any, settings: Settings, limits: GenerationLimits | None = None
) -> GenerateRequest:
    """Validate a decoded body against the contract; raises `InvalidRequest` naming the field.

    `limits`: what the model and the settings allow (`Services.limits`); the settings' own when
    not given."""
    limits = limits or GenerationLimits.from_settings(settings)
    values = check_fields(payload, request_fields(limits))
    if values["width"] * values["height"] > limits.max_pixels:
        raise InvalidRequest(
            f"width×height is {values['width'] * values['height']} pixels; "
            f"the limit is {limits.max_pixels}",
            field="width",
        )
    if not values["prompt"].strip():
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if values["enable_deepfake_check"] and settings.nvidia_api_key is None:
        raise deepfake_unavailable()
    s3_prefix = values.pop("s3_prefix")
    output: Output
    if values.pop("response_format") == ResponseFormat.S3:
        if s3_prefix is None:
            raise InvalidRequest(
                's3_prefix is required when response_format is "s3"', field="s3_prefix"
            )
        allowed = settings.upload_allowed_hosts
        output = UploadTo(check_upload_url(s3_prefix, allowed, field="s3_prefix"))
    elif s3_prefix is not None:
        # Silently dropping it would leave the client waiting for an object that never comes.
        raise InvalidRequest(
            f's3_prefix is only used with response_format "s3", not '
            f'"{ResponseFormat.B64_JSON.value}"',
            field="s3_prefix",
        )
    else:
        output = Inline()
    return GenerateRequest(**values, output=output)


_NSFW_SCORE = (
    "Probability of the label nsfw; 1.0 when the check timed out (5 s budget) or failed; null "
    "when enable_nsfw_check is false."
)
_NSFW_STATUS = "Present only when the check ran."
_NSFW = (
    "The spec's verdict: true when nsfw_score is at or above GATEWAY_NSFW_THRESHOLD or the check "
    "timed out or failed (fail-safe), false below it, null when enable_nsfw_check is false. "
    "It never blocks the upload."
)
_IMAGE_HASH = "MD5 (hex) of exactly the JPEG bytes uploaded or returned."
_MD5 = "^[0-9a-f]{32}$"

@dataclass(frozen=True)
class S3Data:
    """The answer to response_format s3 (also the data block of a 502 upload_failed)."""

    s3_url: str = described(
        "s3_prefix with its file name replaced by {image_hash}.jpg "
        "(GATEWAY_UPLOAD_NAMING=rewrite) or as given (keep); query kept byte for byte."
    )
    nsfw_score: float | None = described(_NSFW_SCORE, minimum=0, maximum=1)
    image_hash: str = described(_IMAGE_HASH, pattern=_MD5)
    s3_upload_status: int | None = described(
        "Last HTTP status from storage; null when it never answered."
    )
    nsfw: bool | None = described(_NSFW)
    nsfw_status: NsfwStatus | None = described(_NSFW_STATUS, omit_none=True)
    deepfake_score: float | None = described(
        deepfake.SCORE_DOC, omit_none=True, minimum=0, maximum=1
    )
    deepfake_status: DeepfakeStatus | None = described(deepfake.STATUS_DOC, omit_none=True)


@dataclass(frozen=True)
class B64Data:
    """The answer to response_format b64_json."""

    b64_json: str = described(
        "Base64 of the JPEG whose MD5 is image_hash.",
        contentEncoding="base64",
        contentMediaType="image/jpeg",
    )
    nsfw_score: float | None = described(_NSFW_SCORE, minimum=0, maximum=1)
    image_hash: str = described(_IMAGE_HASH, pattern=_MD5)
    nsfw: bool | None = described(_NSFW)
    nsfw_status: NsfwStatus | None = described(_NSFW_STATUS, omit_none=True)
    deepfake_score: float | None = described(
        deepfake.SCORE_DOC, omit_none=True, minimum=0, maximum=1
    )
    deepfake_status: DeepfakeStatus | None = described(deepfake.STATUS_DOC, omit_none=True)


@dataclass(frozen=True)
class GenerateResult:
    data: S3Data | B64Data
    upload: UploadResult | None  # None for b64_json

    @property
    def upload_failed(self) -> bool:
        return self.upload is not None and not self.upload.ok


def generate(
    services: Services,
    req: GenerateRequest,
    *,
    deadline_s: float | None = None,
    cancel: threading.Event | None = None,
    priority: contract.Priority | None = None,
) -> GenerateResult:
    """Generate, score, encode, hash, upload (or inline) one image.

    `deadline_s`: Triton's deadline (GATEWAY_TRITON_DEADLINE_S when not given); `cancel`: an
    event that stops the generation inside Triton (raises `Canceled`), for jobs; `priority`: the
    level it queues at in the diffusion model (None: the model's default, BATCH). Who gets which
    is the caller's choice."""
    metrics, settings = services.metrics, services.settings
    deadline_s = settings.triton_deadline_s if deadline_s is None else deadline_s
    # 1. Resolve the upload host once and check every address, before any GPU time is spent;
    #    the upload connects only there.
    target = (
        pin(req.output.url, retry_after_s=settings.retry_after_s)
        if isinstance(req.output, UploadTo)
        else None
    )
    with metrics.stage("total"):
        # 2. Generate (and score, inside the ensemble) on Triton.
        with metrics.stage("triton"):
            generated = services.triton.generate(
                req.generation(),
                nsfw=req.enable_nsfw_check,
                deadline_s=deadline_s,
                cancel=cancel,
                priority=priority,
            )
        nsfw = generated.nsfw
        flagged = nsfw.flagged(settings.nsfw_threshold) if nsfw else None
        metrics.nsfw_checked(nsfw.status if nsfw else None, nsfw.score if nsfw else None)
        metrics.nsfw_verdict("generate", flagged)
        # 3. Encode the JPEG and hash exactly those bytes.
        image = encode_jpeg(generated.image, settings.jpeg_quality)
        metrics.stage_took("encode", image.encode_seconds)
        metrics.stage_took("hash", image.hash_seconds)
        # 4. Check the same bytes for deepfakes while the upload runs.
        pending = (
            services.require_deepfake().start(image.data) if req.enable_deepfake_check else None
        )
        # 5. Upload under the content's name (s3), or keep the bytes for the answer (b64_json).
        upload: UploadResult | None = None
        if target is not None:
            target = rewrite_url(target, image.md5, settings.upload_naming)
            with metrics.stage("upload"):
                upload = services.uploader.put(target, image.data, image.md5)
        # 6. Wait for the deepfake check, no longer than its budget.
        checked = pending.result() if pending is not None else None
        scores: dict[str, Any] = {
            "nsfw_score": nsfw.score if nsfw else None,
            "image_hash": image.md5,
            "nsfw": flagged,
            "nsfw_status": nsfw.status if nsfw else None,
            "deepfake_score": checked.score if checked else None,
            "deepfake_status": checked.status if checked else None,
        }
        data: S3Data | B64Data
        if target is not None and upload is not None:
            data = S3Data(s3_url=target.url, s3_upload_status=upload.status, **scores)
        else:
            data = B64Data(b64_json=base64.b64encode(image.data).decode("ascii"), **scores)
        _log(settings.log_prompt_chars, req, image, data, upload)
        return GenerateResult(data, upload)


def _log(
    prompt_chars: int,
    req: GenerateRequest,
    image: EncodedImage,
    data: S3Data | B64Data,
    upload: UploadResult | None,
) -> None:
    fields: dict[str, str] = {}
    if prompt_chars:  # a prompt may be long or personal: at most this much of it
        fields["prompt"] = truncate(req.prompt, prompt_chars)
    log.info(
        "generated %dx%d (x%d) steps=%d nsfw=%s deepfake=%s format=%s hash=%s%s",
        req.width,
        req.height,
        req.scale,
        req.num_inference_steps,
        data.nsfw_status.value if data.nsfw_status else "off",
        data.deepfake_status.value if data.deepfake_status else "off",
        req.response_format.value,
        image.md5,
        f" upload={upload.status} attempts={len(upload.attempts)}" if upload else "",
        extra=fields,
    )
