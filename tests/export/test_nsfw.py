"""The NSFW exporter: ONNX files, label map, parity printed and enforced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from export.nsfw import (
    CALIBRATION_PHOTOS,
    FAST_TOLERANCE,
    PARITY_PHOTOS,
    REFERENCE,
    VARIANTS,
    ExportError,
    calibration_photos,
    choose_served,
    main,
    photos,
    preprocessing_spec,
    sample_images,
)

NSFW_DEMO = "nsfw"


def expected_serve(variants: dict[str, dict[str, Any]]) -> str:
    """The exporter's rule, restated: the first faster variant in VARIANTS' order whose parity
    holds, else the reference."""
    by_kind = {info["kind"]: file for file, info in variants.items()}
    for variant in VARIANTS:
        file = by_kind.get(variant.kind)
        if file and variants[file]["parity_max_abs_diff"] <= FAST_TOLERANCE:
            return file
    return "model.onnx"


def test_int8_export_writes_every_variant_and_prints_parity(
    demo_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(demo_models / NSFW_DEMO), "--output", str(tmp_path), "--int8"]) == 0
    printed = capsys.readouterr().out
    spec = json.loads((tmp_path / "nsfw.json").read_text())
    assert spec["labels"][spec["nsfw_index"]] == "nsfw"
    assert spec["demo"] is True
    assert spec["image_size"] == [224, 224] and spec["resample"] == "bilinear"
    built = {info["kind"]: (file, info) for file, info in spec["variants"].items()}
    expected = {v.kind for v in VARIANTS if v.available()} | {"onnx-fp32"}
    assert set(built) == expected
    for kind, (file, info) in built.items():
        variant = next((v for v in VARIANTS if v.kind == kind), REFERENCE)
        assert file == variant.file and info["precision"] == variant.precision
        assert info["runtime"] == ("openvino" if file.endswith(".xml") else "onnxruntime")
        assert (tmp_path / file).stat().st_size > 0
        if info["runtime"] == "openvino":
            assert (tmp_path / file).with_suffix(".bin").stat().st_size > 0
            assert info["inference_precision"] in {"bf16", "f32"}
        # Parity on the photographs and on the synthetic samples, each printed.
        assert set(info["parity_by_set"]) == {"photos", "samples"}
        assert info["parity_max_abs_diff"] == max(info["parity_by_set"].values())
        assert f"parity {kind} {file}: max |Δ score| = " in printed
    assert spec["parity_images"]["photos"] == len(PARITY_PHOTOS)
    assert spec["calibration"]["photos"] == list(CALIBRATION_PHOTOS)
    assert built["onnx-fp32"][1]["parity_max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.int8.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size
    # The demo classifier's wide weights put int8 far from fp32, whatever the runtime.
    for kind in ("openvino-int8", "onnx-int8", "onnx-int8-qdq", "onnx-int8-qop"):
        assert built[kind][1]["parity_max_abs_diff"] > FAST_TOLERANCE, kind
    assert spec["serve"] == expected_serve(spec["variants"])
    assert f"serving {spec['serve']} by default: {spec['serve_reason']}" in printed


def test_the_served_variant_is_the_first_in_order_whose_parity_holds() -> None:
    def results(**parity: float) -> dict[str, dict[str, Any]]:
        files = {v.kind: v.file for v in (*VARIANTS, REFERENCE)}
        return {
            files[kind.replace("_", "-")]: {"kind": kind.replace("_", "-"), "parity_max_abs_diff": p}
            for kind, p in parity.items()
        }

    served, why = choose_served(results(onnx_fp32=1e-6, openvino_int8=0.03, onnx_int8=0.01,
                                        onnx_int8_qdq=0.005))
    assert served == "model.int8.onnx"
    assert "onnx-int8" in why and "openvino-int8 0.03" in why
    served, why = choose_served(results(onnx_fp32=1e-6, openvino_int8=0.02, onnx_int8=0.001))
    assert served == "model.openvino-int8.xml"  # the tolerance itself still holds
    served, why = choose_served(results(onnx_fp32=1e-6, openvino_int8=0.021, onnx_int8=0.5))
    assert served == "model.onnx" and "no faster variant" in why
    assert choose_served(results(onnx_fp32=1e-6))[0] == "model.onnx"
    # The order is the table's, not the order the results come in.
    assert [v.kind for v in VARIANTS][:2] == ["openvino-int8", "openvino-bf16"]


def test_calibration_and_parity_photographs_are_separate_and_real() -> None:
    assert not set(CALIBRATION_PHOTOS) & set(PARITY_PHOTOS)
    calibration, parity = calibration_photos(), photos(PARITY_PHOTOS)
    # Mirrored calibration photographs double the set; no image appears on both sides.
    assert len(calibration) == 2 * len(CALIBRATION_PHOTOS)
    fingerprints = {(image.shape, image.tobytes()) for image in calibration}
    assert not any((image.shape, image.tobytes()) in fingerprints for image in parity)
    for image in calibration + parity:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) >= 128 and image.std() > 10


def test_unknown_variants_are_refused(
    demo_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(demo_models / NSFW_DEMO), "--output", str(tmp_path),
            "--variants", "onnx-int8,tensorrt-int4"]
    assert main(args) == 1
    assert "tensorrt-int4" in capsys.readouterr().err


def test_export_fails_when_fp32_parity_exceeds_the_tolerance(
    demo_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(demo_models / NSFW_DEMO), "--output", str(tmp_path), "--tolerance", "0"]
    assert main(args) == 1
    assert "exceeds the tolerance" in capsys.readouterr().err


def test_a_label_map_without_nsfw_is_refused(demo_models: Path, tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(demo_models / NSFW_DEMO, source)
    config = json.loads((source / "config.json").read_text())
    config["id2label"] = {"0": "safe", "1": "unsafe"}
    config["label2id"] = {"safe": 0, "unsafe": 1}
    (source / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(source), "--output", str(tmp_path / "out")]) == 1


def test_a_hub_id_missing_from_the_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", "Falconsai/nsfw_image_detection", "--output", str(tmp_path)]) == 1
    assert "neither a directory nor in the Hugging Face cache" in capsys.readouterr().err


def test_preprocessing_the_served_model_cannot_reproduce_is_refused() -> None:
    base = {
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    assert preprocessing_spec(SimpleNamespace(**base))["image_size"] == [224, 224]
    with pytest.raises(ExportError, match="center cropping"):
        preprocessing_spec(SimpleNamespace(**base, do_center_crop=True))
    with pytest.raises(ExportError, match="fixed height/width"):
        preprocessing_spec(SimpleNamespace(**{**base, "size": {"shortest_edge": 224}}))


def test_sample_images_are_deterministic_and_varied() -> None:
    first, second = sample_images(seed=1), sample_images(seed=1)
    assert all((a == b).all() for a, b in zip(first, second))
    assert len({image.shape for image in first}) >= 5


def test_int8_is_served_when_its_scores_stay_close(demo_models: Path, tmp_path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    source = tmp_path / "model"
    shutil.copytree(demo_models / NSFW_DEMO, source)
    config = json.loads((source / "config.json").read_text())
    torch.manual_seed(0)
    # The usual initialisation: logits stay small, so int8 lands close to fp32.
    ViTForImageClassification(
        ViTConfig.from_pretrained(source, initializer_range=0.02)
    ).save_pretrained(source)
    assert json.loads((source / "config.json").read_text())["id2label"] == config["id2label"]
    args = ["--model", str(source), "--output", str(tmp_path / "out"),
            "--variants", "onnx-int8,openvino-int8"]
    assert main(args) == 0
    spec = json.loads((tmp_path / "out" / "nsfw.json").read_text())
    assert spec["variants"]["model.int8.onnx"]["parity_max_abs_diff"] <= FAST_TOLERANCE
    assert spec["variants"]["model.openvino-int8.xml"]["parity_max_abs_diff"] <= FAST_TOLERANCE
    # Both hold; OpenVINO's comes first in the speed order.
    assert spec["serve"] == "model.openvino-int8.xml"
    assert "openvino-int8" in spec["serve_reason"]
