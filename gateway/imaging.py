"""Triton's RGB tensor to the JPEG that is returned or uploaded, and its MD5.

`image_hash` is the MD5 of exactly these bytes: the same bytes are hashed, uploaded and, with
`b64_json`, returned, so a client can check the object it downloads against the hash.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image


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
