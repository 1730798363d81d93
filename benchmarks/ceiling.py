"""What this CPU can do at best for a ViT classifier: the floor under any NSFW p50.

    python -m benchmarks.ceiling [--model FOLDER_WITH_VIT_CONFIG]

It times one matrix product of the classifier's largest shape (tokens x hidden x intermediate,
the MLP's first layer) with onnxruntime, fp32 and dynamic int8 as the exporter quantizes it,
and takes the best run as the CPU's rate. The model's linear layers, at that rate, give a time
that no variant of the same weights can beat, since they are more than 90 % of a ViT's work
and the rest of the graph only adds to it. The int8 rate depends on the instruction set: with
AVX2 alone, onnxruntime multiplies int8 through 16-bit pairs (VPMADDUBSW), about twice the
fp32 rate; AVX-512 VNNI or AMX does the 8-bit dot products in one instruction.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT8_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8")
OPSET = 17
ONNX_IR_VERSION = 8  # onnxruntime reads up to what its onnx release writes; 8 is enough here


@dataclass(frozen=True)
class VitShape:
    tokens: int
    hidden: int
    intermediate: int
    layers: int

    @classmethod
    def from_config(cls, path: Path) -> VitShape:
        config = json.loads(path.read_text())
        patches = (config["image_size"] // config["patch_size"]) ** 2
        return cls(
            tokens=patches + 1,  # the class token
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
        )

    @property
    def linear_macs(self) -> int:
        """Multiply-accumulates of the quantized layers: q, k, v, output, and the MLP's two."""
        per_token = 4 * self.hidden**2 + 2 * self.hidden * self.intermediate
        return self.layers * self.tokens * per_token


# Falconsai/nsfw_image_detection: ViT-B/16 at 224x224.
VIT_B16 = VitShape(tokens=197, hidden=768, intermediate=3072, layers=12)


@dataclass(frozen=True)
class Ceiling:
    fp32_gmacs: float
    int8_gmacs: float
    int8_floor_ms: float
    fp32_floor_ms: float
    flags: tuple[str, ...]


def cpu_flags() -> tuple[str, ...]:
    """Which of the int8-relevant instruction sets this CPU reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in INT8_FLAGS if flag in present)


def matmul_models(folder: Path, m: int, k: int, n: int) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ONNX_IR_VERSION
    )
    fp32, int8 = folder / "matmul.onnx", folder / "matmul.int8.onnx"
    onnx.save(model, str(fp32))
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quantize_dynamic narrates at INFO and WARNING
    try:
        # As export.nsfw quantizes: int8 weights, activations quantized per call.
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return fp32, int8


def best_seconds(path: Path, x: np.ndarray, runs: int) -> float:
    """The model's best time: the CPU's rate when nothing else got in the way."""
    import onnxruntime as ort

    # One session at a time: a second one's threads would spin-wait after each of its runs
    # and take the cores from this one.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, {"x": x})
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - started)
    return best


def measure(shape: VitShape, runs: int = 50) -> Ceiling:
    m, k, n = shape.tokens, shape.hidden, shape.intermediate
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_s, int8_s = (best_seconds(p, x, runs) for p in matmul_models(Path(tmp), m, k, n))
    macs = m * k * n
    fp32_rate, int8_rate = macs / fp32_s, macs / int8_s
    return Ceiling(
        fp32_gmacs=fp32_rate / 1e9,
        int8_gmacs=int8_rate / 1e9,
        int8_floor_ms=shape.linear_macs / int8_rate * 1000,
        fp32_floor_ms=shape.linear_macs / fp32_rate * 1000,
        flags=cpu_flags(),
    )


def describe(shape: VitShape, ceiling: Ceiling) -> str:
    flags = ", ".join(ceiling.flags) or "none of " + ", ".join(INT8_FLAGS)
    return (
        f"CPU int8 instructions: {flags}\n"
        f"best matrix product {shape.tokens}x{shape.hidden}x{shape.intermediate}: "
        f"fp32 {ceiling.fp32_gmacs:.1f} GMAC/s, int8 {ceiling.int8_gmacs:.1f} GMAC/s "
        f"({ceiling.int8_gmacs / ceiling.fp32_gmacs:.2f}x)\n"
        f"floor for the linear layers alone ({shape.linear_macs / 1e9:.2f} GMAC): "
        f"int8 {ceiling.int8_floor_ms:.1f} ms, fp32 {ceiling.fp32_floor_ms:.1f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a folder with a ViT config.json "
                        "(default: ViT-B/16, Falconsai's shape)")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    shape = VitShape.from_config(args.model / "config.json") if args.model else VIT_B16
    print(describe(shape, measure(shape, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
