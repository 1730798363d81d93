"""The /moderate use case: score an existing image with the NSFW model and, when asked, NVIDIA's
deepfake detection.

    req = check_moderate_json(raw, content_type, settings)   # or check_moderate_form(...)
    result = moderate(services, req)                          # ModerateResult

The image comes base64 in a JSON body or as a file part of a multipart form, and is checked
(bytes, format, pixels) and decoded before anything leaves the gateway."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.fields import FieldSpec, check_fields, parse_body
from gateway.imaging import DecodedImage, ImageRejected, decode_image, encode_jpeg
from gateway.nvidia import deepfake
from gateway.nvidia.deepfake import deepfake_unavailable
from gateway.schema import described
from gateway.services import Services
from gateway.settings import Settings
from gateway.triton.contract import NsfwStatus
from gateway.vocabulary import DeepfakeStatus

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"data:[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+;base64,", re.ASCII)
# The deepfake API takes JPEG and PNG; WebP is re-encoded as JPEG. Not as PNG: a lossless copy
# of a large image took seconds of CPU here and could never fit the API's inline limit anyway.
_API_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}
_REENCODE_QUALITY = 95
# A multipart form is read in pieces of this size, straight into memory: nothing is spooled to
# disk, and a part is refused as soon as its name, or its size, is known to be wrong.
_FORM_CHUNK = 64 * 1024
# The form's text fields hold a word ("true"); anything longer is not one of them.
_MAX_TEXT_PART_BYTES = 1024


def moderate_fields(settings: Settings) -> tuple[FieldSpec, ...]:
    """The /moderate fields (also the source of its OpenAPI schema)."""
    return (
        FieldSpec(
            "image", "string",
            "The image, JPEG, PNG or WebP, at most "
            f"{settings.moderate_max_bytes} bytes and {settings.moderate_max_pixels} pixels. "
            "JSON: base64, optionally as a data URL (`data:image/png;base64,…`); multipart "
            "form: a file part with the raw bytes.",
            required=True,
        ),
        FieldSpec(
            "enable_deepfake_check", "boolean",
            "Also send the image to NVIDIA's deepfake detection; refused when the gateway has "
            'no API key. JSON boolean or "true"/"false".',
            default=False,
        ),
    )


@dataclass(frozen=True)
class ModerateRequest:
    data: bytes  # the image exactly as received
    image: DecodedImage
    enable_deepfake_check: bool

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data, usedforsecurity=False).hexdigest()

    def api_image(self) -> tuple[bytes, str]:
        """The bytes and media type to send to the deepfake API."""
        mime = _API_MIME.get(self.image.format)
        if mime is not None:
            return self.data, mime
        # At full size (the classifier's copy is reduced): faces must stay findable.
        full = decode_image(self.data, self.image.width * self.image.height, reduce_to=None)
        return encode_jpeg(full.pixels, _REENCODE_QUALITY).data, "image/jpeg"


def body_limit(settings: Settings) -> int:
    """Largest /moderate body: the largest image in base64, plus the JSON body allowance."""
    return 4 * math.ceil(settings.moderate_max_bytes / 3) + settings.max_body_bytes


def check_moderate_json(raw: bytes, content_type: str | None, settings: Settings) -> ModerateRequest:
    try:
        payload = parse_body(raw, content_type)
    except UnsupportedMediaType:
        raise UnsupportedMediaType(
            "send the image in a JSON body (Content-Type: application/json) or as a "
            "multipart/form-data upload"
        ) from None
    values = check_fields(payload, moderate_fields(settings))
    return _checked(_b64decode(values["image"]), values["enable_deepfake_check"], settings)


def check_moderate_form(
    stream: IO[bytes], boundary: str | None, settings: Settings
) -> ModerateRequest:
    """Read a multipart form from `stream`: the image as a file part, the other fields as text
    parts, each at most once. Unknown, repeated and oversized parts are refused while the form
    is read, before the rest of the body is."""
    if not boundary or not boundary.isascii():
        raise InvalidRequest("the multipart form has no valid boundary")
    text_fields = {f.name for f in moderate_fields(settings)} - {"image"}
    decoder = MultipartDecoder(boundary.encode("ascii"))
    texts: dict[str, bytearray] = {}
    image: bytearray | None = None
    part: bytearray | None = None
    name = ""
    ended = False
    for chunk in _chunks(stream):
        try:
            decoder.receive_data(chunk)
            event = decoder.next_event()
            while not isinstance(event, NeedData | Epilogue):
                if isinstance(event, Field | File):
                    name = event.name
                    shown = name[:100]
                    if name in texts or (name == "image" and image is not None):
                        raise InvalidRequest(f"field {shown!r} is given more than once", field=shown)
                    if isinstance(event, File) and name == "image":
                        part = image = bytearray()
                    elif name == "image":
                        raise InvalidRequest(
                            "image must be a file part (with a filename) in a multipart form",
                            field="image",
                        )
                    elif name in text_fields and isinstance(event, Field):
                        part = texts[name] = bytearray()
                    else:
                        raise InvalidRequest(f"unknown field {shown!r}", field=shown)
                elif isinstance(event, Data) and part is not None:
                    part += event.data
                    limit = settings.moderate_max_bytes if part is image else _MAX_TEXT_PART_BYTES
                    if len(part) > limit:
                        raise PayloadTooLarge(f"{name} is larger than {limit} bytes", field=name)
                event = decoder.next_event()
            ended = isinstance(event, Epilogue)
        except ValueError:  # the decoder's word for a form it cannot parse
            raise InvalidRequest("the multipart form is malformed") from None
    if not ended:
        raise InvalidRequest("the multipart form is malformed or ends early")
    fields = tuple(f for f in moderate_fields(settings) if f.name != "image")
    values = check_fields({k: v.decode("utf-8", "replace") for k, v in texts.items()}, fields)
    if image is None:
        raise InvalidRequest("image is required", field="image")
    return _checked(bytes(image), values["enable_deepfake_check"], settings)


def _chunks(stream: IO[bytes]) -> Iterator[bytes | None]:
    """The body in pieces, then None: the decoder's signal that no more data comes."""
    yield from iter(lambda: stream.read(_FORM_CHUNK), b"")
    yield None


def _checked(data: bytes, enable_deepfake_check: bool, settings: Settings) -> ModerateRequest:
    if len(data) > settings.moderate_max_bytes:
        raise PayloadTooLarge(
            f"image is larger than {settings.moderate_max_bytes} bytes", field="image"
        )
    if enable_deepfake_check and settings.nvidia_api_key is None:
        raise deepfake_unavailable()
    try:
        image = decode_image(data, settings.moderate_max_pixels)
    except ImageRejected as exc:
        raise InvalidRequest(str(exc), field="image") from None
    return ModerateRequest(data, image, enable_deepfake_check)


def _b64decode(text: str) -> bytes:
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    try:
        # Line breaks are allowed (`base64` wraps at 76 columns); nothing else outside the alphabet.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image is not valid base64", field="image") from None


@dataclass(frozen=True)
class ModerateData:
    """The scores of one image."""

    image_hash: str = described("MD5 (hex) of the image as received.", pattern="^[0-9a-f]{32}$")
    nsfw_score: float = described(
        "Probability of the label nsfw; 1.0 when the classifier timed out (5 s budget) or "
        "failed.",
        minimum=0,
        maximum=1,
    )
    nsfw: bool = described(
        "True when nsfw_score is at or above GATEWAY_NSFW_THRESHOLD or the classifier timed out "
        "or failed (fail-safe); false below it."
    )
    nsfw_status: NsfwStatus = described("The NSFW model's status.")
    deepfake_score: float | None = described(
        deepfake.SCORE_DOC, omit_none=True, minimum=0, maximum=1
    )
    deepfake_status: DeepfakeStatus | None = described(deepfake.STATUS_DOC, omit_none=True)


@dataclass(frozen=True)
class ModerateResult:
    data: ModerateData


def moderate(services: Services, req: ModerateRequest) -> ModerateResult:
    """Score one image: the deepfake check (when asked) runs while the classifier does."""
    metrics, settings = services.metrics, services.settings
    # 1. Start the deepfake check on the bytes as received (WebP re-encoded as JPEG).
    pending = (
        services.require_deepfake().start(*req.api_image()) if req.enable_deepfake_check else None
    )
    # 2. The NSFW classifier alone, with the same fail-safe as inside the ensemble.
    started = time.perf_counter()
    nsfw = services.triton.classify(req.image.pixels, settings.triton_deadline_s)
    metrics.moderation_waited("nsfw", time.perf_counter() - started)
    metrics.nsfw_checked(nsfw.status, None)
    flagged = nsfw.flagged(settings.nsfw_threshold)
    metrics.nsfw_verdict("moderate", flagged)
    # 3. Wait for the deepfake check, no longer than its budget.
    checked = pending.result() if pending is not None else None
    data = ModerateData(
        image_hash=req.md5,
        nsfw_score=nsfw.score,
        nsfw=flagged,
        nsfw_status=nsfw.status,
        deepfake_score=checked.score if checked else None,
        deepfake_status=checked.status if checked else None,
    )
    log.info(
        "moderated %s %dx%d nsfw=%s deepfake=%s hash=%s",
        req.image.format,
        req.image.width,
        req.image.height,
        nsfw.status.value,
        checked.status.value if checked else "off",
        data.image_hash,
    )
    return ModerateResult(data)
