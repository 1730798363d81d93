"""Triton's RGB tensor to the JPEG that is returned or uploaded, and its MD5; and the reverse
for `/moderate`: a client's JPEG, PNG or WebP to the RGB tensor the NSFW model takes.

`image_hash` is the MD5 of exactly these bytes: the same bytes are hashed, uploaded and, with
`b64_json`, returned, so a client can check the object it downloads against the hash.

A client's image is reduced while it is decoded: the classifier squashes every image to
224×224, so nothing past `REDUCED_SIDE` per side reaches it, and a request never holds more
than one full-size copy (a JPEG not even one: libjpeg decodes it at 1/2..1/8 scale).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Only these decoders ever see client bytes: fewer parsers, less attack surface.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
# The shortest side a reduced image keeps: twice the classifier's 224, so its own bilinear
# resize still averages over pixels of the image rather than over a coarse copy of it.
REDUCED_SIDE = 448
# A progressive JPEG costs a pass over every coefficient per scan (about 20 ms a scan at
# 4096×4096 here), and nothing in the format caps the count. libjpeg-turbo's progressive script
# writes 10 scans (6 in greyscale), mozjpeg's 7 (3); 32 leaves room for any real encoder and
# caps the decode of the largest image allowed at well under a second.
MAX_JPEG_SCANS = 32
# Markers a JPEG may hold in all: real files have a few dozen (ICC profiles come in 64 kB
# pieces); the cap bounds the walk below whatever the bytes hold.
_MAX_JPEG_MARKERS = 1024
# The next marker: 0xFF followed by a code that is not stuffing (00), a restart (D0-D7, inside
# entropy-coded data) or fill (FF).
_JPEG_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
_SOS, _EOI = 0xDA, 0xD9
# EXIF orientations that transpose the stored image (5: transpose, 6: 90° clockwise, ...).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Markers that stand alone, without a length: TEM, RST0-7 (outside scans), SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})


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
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, upright (EXIF orientation applied), maybe reduced
    format: str  # one of ACCEPTED_FORMATS
    width: int  # the image's own size, upright, before any reduction
    height: int


def decode_image(
    data: bytes, max_pixels: int, *, reduce_to: int | None = REDUCED_SIDE
) -> DecodedImage:
    """Decode a JPEG, PNG or WebP to RGB as transformers' image pipeline does (EXIF orientation,
    then `convert("RGB")`). The pixel limit, and a JPEG's scan count, are checked before
    decoding. With `reduce_to`, each side larger than twice that is divided by a whole factor
    while decoding (JPEG) or right after (box filter), never below `reduce_to`; None keeps the
    full size."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}×{height} pixels; the limit is {max_pixels} pixels"
                )
            image_format = str(image.format)
            if image_format == "JPEG":
                _check_scans(data)
            reduced = _reduced(image, reduce_to) if reduce_to else image
            # Orientations 5-8 turn the image a quarter: its upright size is the other way round
            # (which a reduced copy, square or not, does not tell).
            turned = reduced.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS
            upright = ImageOps.exif_transpose(reduced)
            pixels = np.asarray(upright.convert("RGB"))
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        raise ImageRejected(f"image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        # Pillow's messages can echo file contents; the client gets a fixed text.
        raise ImageRejected("image is not a readable JPEG, PNG or WebP image") from None
    return DecodedImage(pixels, image_format, *((height, width) if turned else (width, height)))


def _reduced(image: Image.Image, side: int) -> Image.Image:
    """The image with each side divided by the largest whole factor that keeps it >= `side`."""
    # JPEG only: libjpeg scales by 1/2, 1/4 or 1/8 while decoding, keeping both sides >= side.
    image.draft("RGB", (side, side))
    factor = (max(1, image.width // side), max(1, image.height // side))
    # convert("RGB") first where reducing would not commute with it (alpha is dropped, not
    # blended; palettes, CMYK and 16-bit greys are mapped): a full-size copy, once.
    rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
    return rgb.reduce(factor) if factor != (1, 1) else rgb


def _check_scans(data: bytes) -> None:
    """Refuse a JPEG with more scans than MAX_JPEG_SCANS, walking its markers (segment lengths
    skip metadata, so a thumbnail's scans inside EXIF do not count); malformed structure is left
    to the decoder."""
    scans = markers = 0
    match = _JPEG_MARKER.search(data, 2)
    while match is not None and markers < _MAX_JPEG_MARKERS:
        markers += 1
        at = match.start()
        code = data[at + 1]
        if code == _EOI:
            return
        if code in _STANDALONE:
            after = at + 2
        else:
            (length,) = struct.unpack_from(">H", data, at + 2)
            after = at + 2 + length
        if code == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageRejected(
                    f"image is a JPEG with more than {MAX_JPEG_SCANS} scans, more than any "
                    "encoder writes"
                )
        # After a scan's header come its entropy-coded data, which the marker search skips.
        match = _JPEG_MARKER.search(data, after)
    if markers >= _MAX_JPEG_MARKERS:
        raise ImageRejected(f"image is a JPEG with more than {_MAX_JPEG_MARKERS} markers")
