"""benchmarks.ceiling: the model's work counted right, and rates measured, not assumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ceiling
from export.demo_models import VIT_SHAPES


def test_vit_b16_counts_falconsais_linear_work(tmp_path: Path) -> None:
    from transformers import ViTConfig

    # The config the benchmark's ViT-B/16 is built from.
    ViTConfig(image_size=224, patch_size=16, **VIT_SHAPES["vit-b16"]).to_json_file(tmp_path / "c.json")
    shape = ceiling.VitShape.from_config(tmp_path / "c.json")
    assert shape == ceiling.VIT_B16
    # 12 layers x 197 tokens x (4 x 768^2 + 2 x 768 x 3072) multiply-accumulates.
    assert shape.linear_macs == 16_732_127_232


def test_demo_classifier_shape_is_read_from_its_config(demo_models: Path) -> None:
    config = json.loads((demo_models / "nsfw" / "config.json").read_text())
    shape = ceiling.VitShape.from_config(demo_models / "nsfw" / "config.json")
    assert shape.hidden == config["hidden_size"]
    assert shape.tokens == (config["image_size"] // config["patch_size"]) ** 2 + 1


def test_measured_rates_give_the_floor() -> None:
    shape = ceiling.VitShape(tokens=17, hidden=32, intermediate=64, layers=2)
    best = ceiling.measure(shape, runs=3)
    assert best.fp32_gmacs > 0 and best.int8_gmacs > 0
    assert best.int8_floor_ms == pytest.approx(shape.linear_macs / (best.int8_gmacs * 1e6))
    assert best.fp32_floor_ms == pytest.approx(shape.linear_macs / (best.fp32_gmacs * 1e6))
    assert set(best.flags) <= {*ceiling.INT8_FLAGS, *ceiling.BF16_FLAGS}
    # Every runtime a variant can be served with is measured; the floor rests on the fastest.
    int8 = [rate for rate in best.rates if rate.precision == "int8"]
    assert {rate.runtime for rate in int8} == {"onnxruntime", "openvino"}
    assert all(rate.gmacs > 0 for rate in best.rates)
    assert best.int8_gmacs == max(rate.gmacs for rate in int8)
    text = ceiling.describe(shape, best)
    assert "17x32x64" in text and "floor" in text
    assert f"int8 {best.int8_floor_ms:.3g} ms ({best.best('int8').runtime})" in text
    for rate in int8:
        assert f"{rate.runtime} {rate.gmacs:.1f}" in text


def test_the_mlp_is_timed_as_two_products_of_its_own_weights(tmp_path: Path) -> None:
    import onnx

    path, macs = ceiling.mlp_model(tmp_path, 17, 32, 64)
    graph = onnx.load(str(path)).graph
    assert [node.op_type for node in graph.node] == ["MatMul", "MatMul"]
    assert [list(w.dims) for w in graph.initializer] == [[32, 64], [64, 32]]
    assert macs == 2 * 17 * 32 * 64
