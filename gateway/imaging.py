"""Triton's RGB tensor to the JPEG that is returned or uploaded, and its MD5; and the reverse
for `/moderate`: a client's JPEG, PNG or WebP to the RGB tensor the NSFW model takes.

`image_hash` is the MD5 of exactly these bytes: the same bytes are hashed, uploaded and, with
`b64_json`, returned, so a client can check the object it downloads against the hash.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Only these decoders ever see client bytes: fewer parsers, less attack surface.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    md5: str
    width: int
    height: int
    # Measured here, where the work happens: the gateway reports them as separate stages.
    encode_seconds: float = 0.0
    hash_seconds: float = 0.0


def encode_jpeg(pixels: np.ndarray, quality: int) -> EncodedImage:
    """Encode an (H, W, 3) or (1, H, W, 3) uint8 RGB array."""
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3) RGB, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    started = time.perf_counter()
    # frombuffer reads the tensor in place; only a non-contiguous view needs the copy.
    buffer = np.ascontiguousarray(pixels)
    image = Image.frombuffer("RGB", (width, height), buffer, "raw", "RGB", 0, 1)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    data = out.getvalue()
    encoded = time.perf_counter()
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return EncodedImage(
        data=data,
        md5=md5,
        width=width,
        height=height,
        encode_seconds=encoded - started,
        hash_seconds=time.perf_counter() - encoded,
    )


class ImageRejected(ValueError):
    """Bytes that are not an image this service takes; the message is safe to show a client."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, upright (EXIF orientation applied)
    format: str  # one of ACCEPTED_FORMATS
    width: int
    height: int


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a JPEG, PNG or WebP to RGB as transformers' image pipeline does (EXIF orientation,
    then `convert("RGB")`); the pixel limit is checked from the header, before decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}×{height} pixels; the limit is {max_pixels} pixels"
                )
            image_format = str(image.format)
            upright = ImageOps.exif_transpose(image)
            pixels = np.asarray(upright.convert("RGB"))
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        raise ImageRejected(f"image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        # Pillow's messages can echo file contents; the client gets a fixed text.
        raise ImageRejected("image is not a readable JPEG, PNG or WebP image") from None
    return DecodedImage(pixels, image_format, pixels.shape[1], pixels.shape[0])
