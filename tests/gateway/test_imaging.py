from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from gateway.imaging import encode_jpeg


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def test_jpeg_of_the_tensor_size_and_md5_of_exactly_its_bytes() -> None:
    encoded = encode_jpeg(gradient(96, 64)[None], quality=90)
    assert encoded.data[:3] == b"\xff\xd8\xff"
    assert encoded.md5 == hashlib.md5(encoded.data).hexdigest()
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert image.format == "JPEG" and image.size == (64, 96) and image.mode == "RGB"
    assert (encoded.width, encoded.height) == (64, 96)


def test_pixels_survive_encoding() -> None:
    pixels = gradient(64, 64)
    encoded = encode_jpeg(pixels, quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB")).astype(int)
    assert np.abs(decoded - pixels.astype(int)).mean() < 4


def test_quality_changes_the_bytes() -> None:
    pixels = gradient(64, 64)
    assert len(encode_jpeg(pixels, 30).data) < len(encode_jpeg(pixels, 95).data)


def test_a_non_contiguous_view_encodes_like_its_copy() -> None:
    pixels = gradient(64, 128)[:, ::2]
    assert not pixels.flags.c_contiguous
    assert encode_jpeg(pixels, 90).data == encode_jpeg(pixels.copy(), 90).data


def test_read_only_tensors_are_fine() -> None:
    # Triton's client hands out read-only arrays over the response buffer.
    pixels = np.frombuffer(gradient(64, 64).tobytes(), dtype=np.uint8).reshape(1, 64, 64, 3)
    assert not pixels.flags.writeable
    assert encode_jpeg(pixels, 90).width == 64


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32),
     np.zeros((2, 64, 64, 3), np.uint8)],
)
def test_unexpected_tensors_are_refused(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_jpeg(pixels, 90)
