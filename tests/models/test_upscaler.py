"""The upscaler: 2x Lanczos, pass-through at scale 1, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from embedded.triton import TritonServer
from tests.models.helpers import tensors


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.grpc_url)


def upscale(client: grpcclient.InferenceServerClient, images: np.ndarray, scales: list[int]) -> np.ndarray:
    scale = np.array(scales, dtype=np.int32).reshape(-1, 1)
    return client.infer("upscaler", tensors(IMAGE=images, SCALE=scale)).as_numpy("IMAGE")


def random_images(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_scale_two_is_lanczos_at_twice_the_size(client: grpcclient.InferenceServerClient) -> None:
    images = random_images(1, 37, 50)
    out = upscale(client, images, [2])
    expected = np.asarray(Image.fromarray(images[0]).resize((100, 74), Image.LANCZOS))
    assert out.shape == (1, 74, 100, 3)
    assert np.array_equal(out[0], expected)


def test_scale_one_passes_the_image_through(client: grpcclient.InferenceServerClient) -> None:
    images = random_images(2, 24, 16)
    assert upscale(client, images, [1, 1]).tobytes() == images.tobytes()


@pytest.mark.parametrize("scale", [0, 3, -2])
def test_other_scales_are_invalid_arg(client: grpcclient.InferenceServerClient, scale: int) -> None:
    with pytest.raises(InferenceServerException) as error:
        upscale(client, random_images(1, 8, 8), [scale])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "SCALE must be 1 or 2" in error.value.message()
    assert upscale(client, random_images(1, 8, 8), [2]).shape == (1, 16, 16, 3)


def test_output_larger_than_the_cap_is_invalid_arg(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="would exceed"):
        upscale(client, np.zeros((1, 2056, 2056, 3), dtype=np.uint8), [2])
