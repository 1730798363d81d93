"""The /moderate request: an existing image, base64 in a JSON body or a file part of a multipart
form, checked (bytes, format, pixels) and decoded before anything leaves the gateway."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass

from werkzeug.datastructures import FileStorage, MultiDict

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.imaging import DecodedImage, ImageRejected, decode_image, encode_jpeg
from gateway.request import FieldSpec, check_deepfake_configured, check_fields, parse_body
from gateway.settings import Settings

_DATA_URL = re.compile(r"data:[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+;base64,", re.ASCII)
# The deepfake API takes JPEG and PNG; WebP is re-encoded as JPEG. Not as PNG: a lossless copy
# of a large image took seconds of CPU here and could never fit the API's inline limit anyway.
_API_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}
_REENCODE_QUALITY = 95


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
        return encode_jpeg(self.image.pixels, _REENCODE_QUALITY).data, "image/jpeg"


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
    form: MultiDict[str, str], files: MultiDict[str, FileStorage], settings: Settings
) -> ModerateRequest:
    for name in {*form, *files}:
        if len(form.getlist(name)) + len(files.getlist(name)) > 1:
            raise InvalidRequest(f"field {name[:100]!r} is given more than once", field=name[:100])
    if "image" in form:
        raise InvalidRequest(
            "image must be a file part (with a filename) in a multipart form", field="image"
        )
    unknown = sorted(name for name in files if name != "image")
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0][:100]!r}", field=unknown[0][:100])
    fields = tuple(f for f in moderate_fields(settings) if f.name != "image")
    values = check_fields(dict(form.items()), fields)
    upload = files.get("image")
    if upload is None:
        raise InvalidRequest("image is required", field="image")
    data = upload.stream.read(settings.moderate_max_bytes + 1)
    return _checked(data, values["enable_deepfake_check"], settings)


def _checked(data: bytes, enable_deepfake_check: bool, settings: Settings) -> ModerateRequest:
    if len(data) > settings.moderate_max_bytes:
        raise PayloadTooLarge(
            f"image is larger than {settings.moderate_max_bytes} bytes", field="image"
        )
    if enable_deepfake_check:
        check_deepfake_configured(settings)
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
