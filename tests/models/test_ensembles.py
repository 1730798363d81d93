"""The two ensembles: generation with and without the NSFW branch."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from embedded.triton import TritonServer
from tests.models.helpers import executions, generation, tensors


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.grpc_url)


@pytest.mark.parametrize(("scale", "size"), [(1, (96, 64)), (2, (192, 128))])
def test_txt2img_nsfw_returns_the_image_score_and_status(
    client: grpcclient.InferenceServerClient, scale: int, size: tuple[int, int]
) -> None:
    result = client.infer("txt2img_nsfw", tensors(**generation(width=64, height=96, scale=scale)))
    assert result.as_numpy("IMAGE").shape == (1, *size, 3)
    assert 0.0 <= result.as_numpy("NSFW_SCORE")[0, 0] <= 1.0
    assert result.as_numpy("NSFW_STATUS")[0, 0] == b"ok"


def test_txt2img_runs_no_classifier(client: grpcclient.InferenceServerClient) -> None:
    before = executions(client, "nsfw")
    result = client.infer("txt2img", tensors(**generation(width=64, height=96, scale=2)))
    assert result.as_numpy("IMAGE").shape == (1, 192, 128, 3)
    assert {output.name for output in result.get_response().outputs} == {"IMAGE"}
    assert executions(client, "nsfw") == before


def test_ensemble_image_is_the_upscaled_diffusion_image(client: grpcclient.InferenceServerClient) -> None:
    plain = client.infer("txt2img", tensors(**generation(seed=9, scale=1))).as_numpy("IMAGE")
    direct = client.infer("diffusion", tensors(**generation(seed=9, scale=None))).as_numpy("IMAGE")
    assert np.array_equal(plain, direct)
