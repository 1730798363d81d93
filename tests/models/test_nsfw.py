"""The NSFW classifier served by Triton against transformers' pipeline, batching, fail-safes,
on every runtime an exported variant can need."""

from __future__ import annotations

import json
import queue
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.nsfw import (
    FAST_TOLERANCE,
    PARITY_PHOTOS,
    export,
    load_served_module,
    photos,
    reference_scores,
    sample_images,
    variant_model_name,
)
from tests.models.helpers import (
    FAILING_NSFW,
    NSFW_BUDGET_MS,
    OPENVINO_FILE,
    executions,
    generation,
    model_config,
    repository_variant,
    tensors,
)

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
    assert executions(client, "nsfw", at_least=before + 1) - before < len(images)
    assert np.allclose([s for s, _ in together], [s for s, _ in alone], atol=1e-5)


def test_a_request_with_a_wrong_shape_is_invalid_arg(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.infer("nsfw", tensors(IMAGE=np.zeros((1, 8, 8, 4), dtype=np.uint8)))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert score_concurrently(client, [np.zeros((8, 8, 3), dtype=np.uint8)])[0][1] == "ok"


@pytest.fixture(scope="module")
def failing_nsfw(failing_nsfw_triton: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(failing_nsfw_triton.grpc_url) as client:
        yield client


@pytest.mark.parametrize(("variant", "status"), list(FAILING_NSFW.items()))
def test_fail_safe_still_returns_the_image_with_score_one(
    failing_nsfw: grpcclient.InferenceServerClient, variant: str, status: str
) -> None:
    result = failing_nsfw.infer(
        f"txt2img_nsfw_{variant}", tensors(**generation(width=64, height=96, scale=2))
    )
    assert result.as_numpy("IMAGE").shape == (1, 192, 128, 3)
    assert result.as_numpy("NSFW_SCORE")[0, 0] == 1.0
    assert result.as_numpy("NSFW_STATUS")[0, 0] == status.encode()


def test_the_budget_is_the_specs_5_s(triton: TritonServer) -> None:
    # The spec: a check that takes over 5 s scores 1.0. The budget is config.pbtxt's, and the
    # classifier the session's Triton serves was loaded with it.
    assert model_config("nsfw").parameters["budget_ms"].string_value == str(NSFW_BUDGET_MS)
    assert triton.log_path is not None
    loaded = re.findall(r"nsfw: .*, budget (\S+)s, status ok", triton.log_path.read_text())
    assert loaded and {float(seconds) for seconds in loaded} == {NSFW_BUDGET_MS / 1000}, loaded


def test_a_classifier_held_past_the_budget_scores_1_once_the_budget_is_out(
    failing_nsfw: grpcclient.InferenceServerClient,
) -> None:
    # nsfw_held runs until it is stopped, under the config's own budget: the model stops it there.
    started = time.monotonic()
    result = failing_nsfw.infer("nsfw_held", tensors(IMAGE=sample_images(seed=8)[0][None]))
    assert time.monotonic() - started >= NSFW_BUDGET_MS / 1000
    assert (result.as_numpy("NSFW_SCORE")[0, 0], result.as_numpy("NSFW_STATUS")[0, 0]) == (
        1.0, b"timeout")


@pytest.fixture(scope="module")
def faithful_export(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ViT with the usual initialisation (its int8 and bf16 scores stay close), exported
    with every variant this machine can build, into a version folder of its own."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    source = tmp_path_factory.mktemp("faithful") / "model"
    shutil.copytree(demo_models / "nsfw", source)
    torch.manual_seed(0)
    ViTForImageClassification(
        ViTConfig.from_pretrained(source, initializer_range=0.02)
    ).save_pretrained(source)
    version = tmp_path_factory.mktemp("faithful-export") / "1"
    shutil.copytree(DEFAULT_REPOSITORY / "nsfw" / "1", version)
    export(str(source), version, int8=True)
    return version


@pytest.fixture(scope="module")
def variants_client(
    faithful_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[grpcclient.InferenceServerClient]:
    """A Triton serving the faithful export once per variant (pinned to its file) and once as
    `nsfw_auto` (model_file auto, the exporter's choice)."""
    repository = tmp_path_factory.mktemp("variants-repository")
    auto = repository / "nsfw_auto"
    shutil.copytree(faithful_export, auto / "1")
    config = (DEFAULT_REPOSITORY / "nsfw" / "config.pbtxt").read_text()
    (auto / "config.pbtxt").write_text(config.replace('name: "nsfw"', 'name: "nsfw_auto"'))
    spec = json.loads((faithful_export / "nsfw.json").read_text())
    for file, info in spec["variants"].items():
        name = variant_model_name(info["kind"])
        repository_variant(repository, "nsfw", name,
                 {'string_value: "auto"': f'string_value: "{faithful_export / file}"'})
    # As deployments mount it: a folder, once whole, once with only the reference file copied.
    reference_only = tmp_path_factory.mktemp("reference-only")
    for file in ("model.onnx", "nsfw.json"):
        shutil.copy(faithful_export / file, reference_only / file)
    for name, folder in (("nsfw_folder", faithful_export), ("nsfw_reference_only", reference_only)):
        repository_variant(repository, "nsfw", name, {'string_value: "auto"': f'string_value: "{folder}"'})
    server = TritonServer.on_free_ports(repository, tmp_path_factory.mktemp("variants-triton"))
    yield grpcclient.InferenceServerClient(server.grpc_url)
    server.stop()


def test_every_variant_scores_as_its_export_measured_whichever_runtime_serves(
    variants_client: grpcclient.InferenceServerClient, faithful_export: Path
) -> None:
    spec = json.loads((faithful_export / "nsfw.json").read_text())
    assert {info["runtime"] for info in spec["variants"].values()} == {"onnxruntime", "openvino"}
    images = photos(PARITY_PHOTOS)
    expected = reference_scores(spec["source"], images, "nsfw")
    assert np.ptp(expected) > 0.01
    for info in spec["variants"].values():
        name = variant_model_name(info["kind"])
        served = [score_concurrently(variants_client, [image], name)[0] for image in images]
        assert [status for _, status in served] == ["ok"] * len(images), name
        differences = np.abs(np.array([score for score, _ in served]) - expected)
        # Triton gives what the exporter measured on these photographs, with the same code...
        assert differences.max() <= info["parity_by_set"]["photos"] + 1e-5, (name, differences)
        # ...and within the tolerance that let the variant be served.
        tolerance = PARITY if info["precision"] == "fp32" else FAST_TOLERANCE
        assert differences.max() <= tolerance, (name, differences)


def test_auto_serves_the_exporters_choice(
    variants_client: grpcclient.InferenceServerClient, faithful_export: Path
) -> None:
    spec = json.loads((faithful_export / "nsfw.json").read_text())
    assert spec["serve"] != "model.onnx"  # a faster variant held parity on this model
    chosen = variant_model_name(spec["variants"][spec["serve"]]["kind"])
    images = sample_images(seed=6)
    auto = [score_concurrently(variants_client, [image], "nsfw_auto")[0] for image in images]
    pinned = [score_concurrently(variants_client, [image], chosen)[0] for image in images]
    assert auto == pinned


def test_a_folder_serves_the_exporters_choice_or_the_reference_copied_alone(
    variants_client: grpcclient.InferenceServerClient, faithful_export: Path
) -> None:
    spec = json.loads((faithful_export / "nsfw.json").read_text())
    chosen = variant_model_name(spec["variants"][spec["serve"]]["kind"])
    images = sample_images(seed=7)

    def scores(model: str) -> list[tuple[float, str]]:
        return [score_concurrently(variants_client, [image], model)[0] for image in images]

    assert scores("nsfw_folder") == scores(chosen)
    fp32 = scores("nsfw_onnx_fp32")
    assert scores("nsfw_reference_only") == fp32
    assert fp32 != scores(chosen)  # the two cases above can be told apart


@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx", OPENVINO_FILE])
def test_a_run_past_its_deadline_is_stopped_and_the_runner_goes_on(
    faithful_export: Path, file: str
) -> None:
    runtimes = load_served_module("runtimes", faithful_export)
    runner = runtimes.open_runner(faithful_export / file)
    # Hundreds of images: a run far longer than the 1 ms deadline, whatever the machine.
    pixels = np.zeros((256, 3, 224, 224), dtype=np.float32)
    with pytest.raises(runtimes.Timeout):
        runner(pixels, timeout_s=0.001)
    with pytest.raises(runtimes.Timeout):
        runner(pixels[:1], timeout_s=0.0)
    assert runner(pixels[:2], timeout_s=60.0).shape == (2, 2)
