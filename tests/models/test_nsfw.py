"""The NSFW classifier served by Triton against transformers' pipeline, batching, fail-safes."""

from __future__ import annotations

import json
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.nsfw import reference_scores, sample_images
from tests.models.helpers import executions, generation, tensors

PARITY = 1e-4


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.grpc_url)


def score_concurrently(
    client: grpcclient.InferenceServerClient, images: list[np.ndarray], model: str = "nsfw"
) -> list[tuple[float, str]]:
    """One request per image, all in flight at once, so the dynamic batcher can group them."""
    results: queue.Queue = queue.Queue()
    for index, image in enumerate(images):
        client.async_infer(
            model,
            tensors(IMAGE=image[None]),
            callback=lambda result, error, index=index: results.put((index, result, error)),
        )
    scores: list[tuple[float, str]] = [(0.0, "")] * len(images)
    for _ in images:
        index, result, error = results.get(timeout=60)
        assert error is None, error
        scores[index] = (
            float(result.as_numpy("NSFW_SCORE")[0, 0]),
            result.as_numpy("NSFW_STATUS")[0, 0].decode(),
        )
    return scores


def test_scores_match_the_transformers_pipeline(
    client: grpcclient.InferenceServerClient, demo_models: Path
) -> None:
    images = sample_images(seed=3)
    assert any(image.shape[0] != image.shape[1] for image in images)
    served = score_concurrently(client, images)
    expected = reference_scores(str(demo_models / "nsfw"), images, "nsfw")
    assert [status for _, status in served] == ["ok"] * len(images)
    differences = np.abs(np.array([score for score, _ in served]) - expected)
    assert differences.max() <= PARITY, differences
    # The demo classifier is wide enough that scores really differ between images.
    assert np.ptp(expected) > 0.01


def test_images_of_different_sizes_share_batches(client: grpcclient.InferenceServerClient) -> None:
    images = sample_images(seed=4)[:6] + sample_images(seed=5)[:2]
    alone = [score_concurrently(client, [image])[0] for image in images]
    before = executions(client, "nsfw")
    together = score_concurrently(client, images)
    assert executions(client, "nsfw") - before < len(images)
    assert np.allclose([s for s, _ in together], [s for s, _ in alone], atol=1e-5)


def test_a_request_with_a_wrong_shape_is_invalid_arg(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer("nsfw", tensors(IMAGE=np.zeros((1, 8, 8, 4), dtype=np.uint8)))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert score_concurrently(client, [np.zeros((8, 8, 3), dtype=np.uint8)])[0][1] == "ok"


def _variant(repository: Path, source: str, name: str, replace: dict[str, str]) -> Path:
    config = (DEFAULT_REPOSITORY / source / "config.pbtxt").read_text()
    for old, new in {f'name: "{source}"': f'name: "{name}"', **replace}.items():
        assert old in config, old
        config = config.replace(old, new)
    target = repository / name
    if (DEFAULT_REPOSITORY / source / "1").exists():
        shutil.copytree(DEFAULT_REPOSITORY / source / "1", target / "1")
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    return target


@pytest.fixture(scope="module")
def failing_nsfw(
    demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[grpcclient.InferenceServerClient]:
    """A second Triton whose NSFW models time out (tiny budget) or cannot load (corrupt ONNX)."""
    repository = tmp_path_factory.mktemp("failsafe-repository")
    shutil.copytree(DEFAULT_REPOSITORY / "diffusion", repository / "diffusion")
    shutil.copytree(DEFAULT_REPOSITORY / "upscaler", repository / "upscaler")
    budget = '"budget_ms"\n    value: { string_value: "5000" }'
    _variant(repository, "nsfw", "nsfw_slow", {budget: budget.replace("5000", "0.001")})
    broken = _variant(repository, "nsfw", "nsfw_broken", {})
    served = json.loads((broken / "1" / "nsfw.json").read_text())["serve"]
    (broken / "1" / served).write_bytes(b"this is not an ONNX protobuf" * 10)
    for variant in ("slow", "broken"):
        _variant(
            repository,
            "txt2img_nsfw",
            f"txt2img_nsfw_{variant}",
            {'model_name: "nsfw"': f'model_name: "nsfw_{variant}"'},
        )
    server = TritonServer.on_free_ports(
        repository,
        tmp_path_factory.mktemp("failsafe-triton"),
        env={"IMAGEGEN_DIFFUSION_MODEL": str(demo_models / "diffusion")},
    )
    yield grpcclient.InferenceServerClient(server.grpc_url)
    server.stop()


@pytest.mark.parametrize(("variant", "status"), [("slow", "timeout"), ("broken", "error")])
def test_fail_safe_still_returns_the_image_with_score_one(
    failing_nsfw: grpcclient.InferenceServerClient, variant: str, status: str
) -> None:
    result = failing_nsfw.infer(
        f"txt2img_nsfw_{variant}", tensors(**generation(width=64, height=96, scale=2))
    )
    assert result.as_numpy("IMAGE").shape == (1, 192, 128, 3)
    assert result.as_numpy("NSFW_SCORE")[0, 0] == 1.0
    assert result.as_numpy("NSFW_STATUS")[0, 0] == status.encode()
