from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from export.nsfw import DEFAULT_OUTPUT, load_served_module, sample_images
from gateway.imaging import (
    MAX_JPEG_SCANS,
    REDUCED_SIDE,
    ImageRejected,
    decode_image,
    encode_jpeg,
)


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


def progressive(pixels: np.ndarray, extra_scans: int = 0, app15: bytes = b"") -> bytes:
    """A progressive JPEG (libjpeg's script: 10 scans), `extra_scans` copies of its last scan
    added, and an APP15 segment holding `app15` after SOI."""
    data = encoded(pixels, "JPEG", quality=90, progressive=True)
    end = data.rindex(b"\xff\xd9")
    last_scan = data.rindex(b"\xff\xda", 0, end)
    data = data[:end] + data[last_scan:end] * extra_scans + data[end:]
    segment = b"\xff\xef" + (len(app15) + 2).to_bytes(2, "big") + app15 if app15 else b""
    return data[:2] + segment + data[2:]


def test_a_jpeg_may_have_up_to_max_jpeg_scans() -> None:
    pixels = gradient(64, 64)
    assert progressive(pixels).count(b"\xff\xda") == 10
    at_cap = progressive(pixels, MAX_JPEG_SCANS - 10)
    assert decode_image(at_cap, 64 * 64).pixels.shape == (64, 64, 3)
    with pytest.raises(ImageRejected, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(progressive(pixels, MAX_JPEG_SCANS - 9), 64 * 64)


def test_scans_are_counted_by_walking_the_markers_not_by_searching_the_bytes() -> None:
    # Metadata may hold the bytes of a scan marker (an EXIF thumbnail is a whole JPEG): a
    # segment's length skips it, so only the image's own scans count.
    data = progressive(gradient(64, 64), app15=b"\xff\xda" * 1000)
    assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
    assert decode_image(data, 64 * 64).pixels.shape == (64, 64, 3)


def test_a_jpeg_of_endless_markers_is_refused() -> None:
    data = encoded(gradient(8, 8), "JPEG")
    comments = b"\xff\xfe\x00\x02" * 5000  # empty COM segments
    with pytest.raises(ImageRejected, match="more than 1024 markers"):
        decode_image(data[:2] + comments + data[2:], 64)


@pytest.mark.parametrize(
    ("image_format", "size", "reduced"),
    [
        ("PNG", (4000, 3000), (500, 500)),  # divided by 8 and 6: both sides still >= 448
        ("JPEG", (4096, 4096), (512, 512)),  # libjpeg's 1/8 scale, while decoding
        ("WEBP", (1800, 900), (450, 450)),
        ("PNG", (9000, 300), (450, 300)),  # each side on its own; a short side is kept
        ("PNG", (895, 895), (895, 895)),  # below twice REDUCED_SIDE: kept as it is
    ],
)
def test_large_images_are_reduced_while_decoding_and_keep_their_own_size(
    image_format: str, size: tuple[int, int], reduced: tuple[int, int]
) -> None:
    data = encoded(np.zeros((size[1], size[0], 3), np.uint8), image_format)
    decoded = decode_image(data, size[0] * size[1])
    assert (decoded.width, decoded.height) == size
    assert decoded.pixels.shape == (reduced[1], reduced[0], 3)
    assert min(reduced) >= min(REDUCED_SIDE, *size)
    full = decode_image(data, size[0] * size[1], reduce_to=None)
    assert full.pixels.shape == (size[1], size[0], 3)


def test_reduction_and_rotation_together() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded(np.zeros((1000, 3000, 3), np.uint8), "PNG", exif=exif.tobytes())
    decoded = decode_image(data, 3000 * 1000)
    assert (decoded.width, decoded.height) == (1000, 3000)  # upright
    assert decoded.pixels.shape == (500, 500, 3)  # 3000/6 × 1000/2, turned


def test_the_classifier_sees_nearly_what_the_full_image_would_give_it() -> None:
    # The served preprocessing (bilinear to 224×224, normalised to [-1, 1]) of the reduced image
    # against that of the full one: within 0.02 on average, about 2.5 of 255 levels.
    preprocess = load_served_module("preprocess")
    spec = json.loads((DEFAULT_OUTPUT / "nsfw.json").read_text())
    model_input = preprocess.Preprocessor(spec)
    for pixels in sample_images(seed=11)[:4]:
        big = Image.fromarray(pixels).resize((2400, 1800), Image.BICUBIC)
        for image_format, options in (("PNG", {"compress_level": 1}), ("JPEG", {"quality": 92})):
            out = io.BytesIO()
            big.save(out, format=image_format, **options)
            data = out.getvalue()
            full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            reduced = decode_image(data, 2400 * 1800).pixels
            assert max(reduced.shape) <= 600
            difference = np.abs(model_input([full]) - model_input([reduced]))
            assert difference.mean() < 0.02, (pixels.shape, image_format, difference.mean())
