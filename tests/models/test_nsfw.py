"""The NSFW classifier served by Triton against transformers' pipeline, batching, fail-safes,
on every runtime an exported variant can need."""

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
from export.nsfw import (
    FAST_TOLERANCE,
    PARITY_PHOTOS,
    export,
    load_served_module,
    photos,
    reference_scores,
    sample_images,
)
from tests.models.helpers import executions, generation, tensors

PARITY = 1e-4
# The demo repository's OpenVINO int8 file (built by export.demo_models, served by name here).
OPENVINO_FILE = "model.openvino-int8.xml"


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
    # The same two failures with the OpenVINO runtime serving.
    openvino = {'string_value: "auto"': f'string_value: "{OPENVINO_FILE}"'}
    _variant(repository, "nsfw", "nsfw_slow_openvino",
             {budget: budget.replace("5000", "0.001"), **openvino})
    broken = _variant(repository, "nsfw", "nsfw_broken_openvino", openvino)
    (broken / "1" / OPENVINO_FILE).write_bytes(b"<net>not an OpenVINO model</net>")
    for variant in ("slow", "broken", "slow_openvino", "broken_openvino"):
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


@pytest.mark.parametrize(
    ("variant", "status"),
    [("slow", "timeout"), ("broken", "error"),
     ("slow_openvino", "timeout"), ("broken_openvino", "error")],
)
def test_fail_safe_still_returns_the_image_with_score_one(
    failing_nsfw: grpcclient.InferenceServerClient, variant: str, status: str
) -> None:
    result = failing_nsfw.infer(
        f"txt2img_nsfw_{variant}", tensors(**generation(width=64, height=96, scale=2))
    )
    assert result.as_numpy("IMAGE").shape == (1, 192, 128, 3)
    assert result.as_numpy("NSFW_SCORE")[0, 0] == 1.0
    assert result.as_numpy("NSFW_STATUS")[0, 0] == status.encode()


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
        name = "nsfw_" + info["kind"].replace("-", "_")
        _variant(repository, "nsfw", name,
                 {'string_value: "auto"': f'string_value: "{faithful_export / file}"'})
    # As deployments mount it: a folder, once whole, once with only the reference file copied.
    reference_only = tmp_path_factory.mktemp("reference-only")
    for file in ("model.onnx", "nsfw.json"):
        shutil.copy(faithful_export / file, reference_only / file)
    for name, folder in (("nsfw_folder", faithful_export), ("nsfw_reference_only", reference_only)):
        _variant(repository, "nsfw", name, {'string_value: "auto"': f'string_value: "{folder}"'})
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
        name = "nsfw_" + info["kind"].replace("-", "_")
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
    chosen = "nsfw_" + spec["variants"][spec["serve"]]["kind"].replace("-", "_")
    images = sample_images(seed=6)
    auto = [score_concurrently(variants_client, [image], "nsfw_auto")[0] for image in images]
    pinned = [score_concurrently(variants_client, [image], chosen)[0] for image in images]
    assert auto == pinned


def test_a_folder_serves_the_exporters_choice_or_the_reference_copied_alone(
    variants_client: grpcclient.InferenceServerClient, faithful_export: Path
) -> None:
    spec = json.loads((faithful_export / "nsfw.json").read_text())
    chosen = "nsfw_" + spec["variants"][spec["serve"]]["kind"].replace("-", "_")
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
