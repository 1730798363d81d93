"""The NSFW exporter: ONNX files, label map, parity printed and enforced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.nsfw import ExportError, main, preprocessing_spec, sample_images

NSFW_DEMO = "nsfw"


def test_int8_export_writes_both_files_and_prints_parity(
    demo_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(demo_models / NSFW_DEMO), "--output", str(tmp_path), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "parity fp32 model.onnx: max |Δ score|" in printed
    assert "parity int8 model.int8.onnx: max |Δ score|" in printed
    spec = json.loads((tmp_path / "nsfw.json").read_text())
    assert spec["labels"][spec["nsfw_index"]] == "nsfw"
    assert spec["demo"] is True
    assert spec["image_size"] == [224, 224] and spec["resample"] == "bilinear"
    assert spec["variants"]["model.onnx"]["parity_max_abs_diff"] <= 1e-4
    assert spec["variants"]["model.int8.onnx"]["precision"] == "int8"
    assert (tmp_path / "model.int8.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size
    # The demo classifier's wide weights put int8 far from fp32, so fp32 is what gets served.
    assert spec["variants"]["model.int8.onnx"]["parity_max_abs_diff"] > 0.02
    assert spec["serve"] == "model.onnx"
    assert "serving model.onnx by default" in printed


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
    assert main(["--model", str(source), "--output", str(tmp_path / "out"), "--int8"]) == 0
    spec = json.loads((tmp_path / "out" / "nsfw.json").read_text())
    assert spec["variants"]["model.int8.onnx"]["parity_max_abs_diff"] <= 0.02
    assert spec["serve"] == "model.int8.onnx"
