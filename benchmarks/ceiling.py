"""What this CPU can do at best for a ViT classifier: the floor under any NSFW p50.

    python -m benchmarks.ceiling [--model FOLDER_WITH_VIT_CONFIG]

It times the classifier's MLP (tokens x hidden x intermediate, its largest product, then back
through the second layer; weights of its own, in cache) with every runtime the exported variants
run on, onnxruntime and OpenVINO, in fp32 and in int8 as the exporter quantizes (onnxruntime:
dynamic; OpenVINO: static, NNCF), and bf16 with OpenVINO where the CPU has it. The best run of
the fastest runtime is the CPU's rate: the floor must not rest on a slow kernel. The model's
linear layers, at that rate, give a time that no variant of the same weights can beat, since
they are more than 90 % of a ViT's work and the rest of the graph only adds to it.

The int8 rate depends on the instruction set: with AVX2 alone, onnxruntime multiplies int8
through 16-bit pairs (VPMADDUBSW), about twice the fp32 rate; AVX-512 VNNI does the 8-bit dot
products in one instruction, and AMX (onnxruntime's MLAS and OpenVINO's oneDNN both use it) in
tiles of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.quiet import no_console_output, quiet_root_logger

INT8_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
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
# Runs per sample of int8_probe.
PROBE_BURST = 5


@dataclass(frozen=True)
class Rate:
    runtime: str
    precision: str
    gmacs: float


@dataclass(frozen=True)
class Ceiling:
    rates: tuple[Rate, ...]
    linear_macs: int
    flags: tuple[str, ...]

    def best(self, precision: str) -> Rate:
        return max((r for r in self.rates if r.precision == precision), key=lambda r: r.gmacs)

    def floor_ms(self, precision: str) -> float:
        return self.linear_macs / (self.best(precision).gmacs * 1e9) * 1000

    @property
    def fp32_gmacs(self) -> float:
        return self.best("fp32").gmacs

    @property
    def int8_gmacs(self) -> float:
        return self.best("int8").gmacs

    @property
    def int8_floor_ms(self) -> float:
        return self.floor_ms("int8")

    @property
    def fp32_floor_ms(self) -> float:
        return self.floor_ms("fp32")


def cpu_flags() -> tuple[str, ...]:
    """Which of the int8- and bf16-relevant instruction sets this CPU reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in (*INT8_FLAGS, *BF16_FLAGS) if flag in present)


def mlp_model(folder: Path, m: int, k: int, n: int) -> tuple[Path, int]:
    """An fp32 ONNX file: x [m, k] through an MLP's two layers (k -> n -> k); and its MACs.

    Two layers rather than one: a runtime's fixed cost per call then weighs less (OpenVINO's
    one layer ran at 457-602 GMAC/s where two ran at 704-1033, on an AMX Xeon). More would not
    stay in cache: through 4 MLPs of their own weights onnxruntime fell to 216-573."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    up = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    down = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "up"], ["h"]),
            helper.make_node("MatMul", ["h", "down"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, k])],
        [numpy_helper.from_array(up, "up"), numpy_helper.from_array(down, "down")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ONNX_IR_VERSION
    )
    path = folder / "mlp.onnx"
    onnx.save(model, str(path))
    return path, 2 * m * k * n


def best_seconds(run: Callable[[], object], runs: int, warmup: int = 5) -> float:
    """The best time: the CPU's rate when nothing else got in the way."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def onnxruntime_runs(
    path: Path, x: np.ndarray, spinning: bool = True
) -> Iterator[tuple[str, Callable[[], object]]]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = path.with_suffix(".int8.onnx")
    with quiet_root_logger():
        # As export.nsfw quantizes: int8 weights, activations quantized per call.
        quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    for precision, file in (("fp32", path), ("int8", int8)):
        # One session at a time: a second one's threads would spin-wait after each of its runs
        # and take the cores from this one.
        options = ort.SessionOptions()
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        session = ort.InferenceSession(
            str(file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        yield precision, lambda session=session: session.run(None, {"x": x})
        del session


def openvino_runs(
    path: Path, x: np.ndarray, spinning: bool = True
) -> Iterator[tuple[str, Callable[[], object]]]:
    """`spinning` is onnxruntime's switch; OpenVINO's threads have none, so it is ignored."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    nncf.set_log_level(logging.ERROR)
    # As export.nsfw quantizes: static int8, activations calibrated (here on the input itself).
    with no_console_output():
        int8 = nncf.quantize(model.clone(), nncf.Dataset([x]), subset_size=1)
    plans = [("fp32", model, "f32"), ("int8", int8, "f32")]
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        plans.append(("bf16", model, "bf16"))
    for precision, graph, hint in plans:
        compiled = core.compile_model(
            graph,
            "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
             "INFERENCE_PRECISION_HINT": hint},
        )
        request = compiled.create_infer_request()
        yield precision, lambda request=request: request.infer({0: x})
        del request, compiled


RUNTIMES = {"onnxruntime": onnxruntime_runs, "openvino": openvino_runs}


def measure(shape: VitShape, runs: int = 50) -> Ceiling:
    m, k, n = shape.tokens, shape.hidden, shape.intermediate
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        path, macs = mlp_model(Path(tmp), m, k, n)
        for runtime, plans in RUNTIMES.items():
            for precision, run in plans(path, x):
                rates.append(Rate(runtime, precision, macs / best_seconds(run, runs) / 1e9))
    return Ceiling(rates=tuple(rates), linear_macs=shape.linear_macs, flags=cpu_flags())


@contextmanager
def int8_probe(shape: VitShape, runtime: str) -> Iterator[Callable[[], float]]:
    """A callable that runs the int8 MLP a few times with `runtime` and returns the time the
    model's linear layers would take at the best of those runs' rates, in ms: the floor, sampled
    whenever called, so that a benchmark can take it under the same machine noise as the runs it
    compares. The best of a short burst, as the floor is a best: its first run pays for waking
    threads and cold caches, costs that scaled to the whole model would say nothing of the
    kernel."""
    m, k, n = shape.tokens, shape.hidden, shape.intermediate
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path, macs = mlp_model(Path(tmp), m, k, n)
        # Not spinning after its runs: the runs beside it must have the cores.
        plans = RUNTIMES[runtime](path, x, spinning=False)
        run = next(run for precision, run in plans if precision == "int8")
        run()

        def floor_ms() -> float:
            return best_seconds(run, runs=PROBE_BURST, warmup=0) * shape.linear_macs / macs * 1000

        try:
            yield floor_ms
        finally:
            plans.close()


def describe(shape: VitShape, ceiling: Ceiling) -> str:
    flags = ", ".join(ceiling.flags) or "none of " + ", ".join((*INT8_FLAGS, *BF16_FLAGS))
    precisions = sorted({r.precision for r in ceiling.rates}, key=["int8", "bf16", "fp32"].index)
    by_runtime = "; ".join(
        f"{p}: " + ", ".join(f"{r.runtime} {r.gmacs:.1f}" for r in ceiling.rates if r.precision == p)
        for p in precisions
    )
    floors = ", ".join(
        f"{p} {ceiling.floor_ms(p):.3g} ms ({ceiling.best(p).runtime})" for p in precisions
    )
    return (
        f"CPU instructions: {flags}\n"
        f"best matrix product {shape.tokens}x{shape.hidden}x{shape.intermediate} "
        f"and back, GMAC/s: {by_runtime}\n"
        f"int8 over fp32: {ceiling.int8_gmacs / ceiling.fp32_gmacs:.2f}x\n"
        f"floor for the linear layers alone ({shape.linear_macs / 1e9:.2f} GMAC) at the best "
        f"rate of any runtime: {floors}"
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
