from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from gateway.imaging import ImageRejected, decode_image, encode_jpeg


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


def encoded(pixels: np.ndarray, image_format: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=image_format, **options)
    return out.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_lossless_images_decode_to_their_pixels(image_format: str) -> None:
    pixels = gradient(40, 60)
    options = {"lossless": True} if image_format == "WEBP" else {}
    decoded = decode_image(encoded(pixels, image_format, **options), max_pixels=60 * 40)
    assert (decoded.format, decoded.width, decoded.height) == (image_format, 60, 40)
    assert decoded.pixels.dtype == np.uint8 and np.array_equal(decoded.pixels, pixels)


def test_jpeg_decodes_like_pillow_and_other_modes_become_rgb() -> None:
    data = encoded(gradient(32, 48), "JPEG", quality=80)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_image(data, 10_000).pixels, expected)
    rgba = np.dstack([gradient(8, 8), np.full((8, 8), 7, np.uint8)])
    assert decode_image(encoded(rgba, "PNG"), 64).pixels.shape == (8, 8, 3)
    assert decode_image(encoded(gradient(8, 8)[..., 0], "PNG"), 64).pixels.shape == (8, 8, 3)


def test_exif_orientation_is_applied() -> None:
    # Stored 60 wide, 40 high, with "rotate 90° clockwise to display" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(gradient(40, 60), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, 10_000)
    assert (decoded.width, decoded.height) == (40, 60)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", encoded(gradient(8, 8), "GIF"), encoded(gradient(8, 8), "BMP"),
     encoded(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8), "PNG")[:2000]],
    ids=["empty", "text", "gif", "bmp", "truncated"],
)
def test_unreadable_or_other_formats_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageRejected, match="not a readable JPEG, PNG or WebP image"):
        decode_image(data, 10_000)


def test_the_pixel_limit_holds() -> None:
    data = encoded(gradient(40, 60), "PNG")
    assert decode_image(data, 2400).width == 60
    with pytest.raises(ImageRejected, match="60×40 pixels; the limit is 2399"):
        decode_image(data, 2399)
