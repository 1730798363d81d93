"""Each benchmark script runs at tiny sizes and prints the summary lines `make bench` promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^(\w+): (-?[0-9.e+]+|inf|nan)$", re.MULTILINE)


def run(module: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def summary(stdout: str) -> dict[str, float]:
    return {name: float(value) for name, value in SUMMARY.findall(stdout)}


@pytest.mark.usefixtures("demo_models")
def test_nsfw_benchmark_smoke() -> None:
    stdout = run("benchmarks.nsfw")
    figures = summary(stdout)
    assert set(figures) == {"nsfw_speedup_vs_pipeline", "nsfw_p50_ms", "nsfw_floor_ratio"}
    assert figures["nsfw_p50_ms"] > 0 and figures["nsfw_speedup_vs_pipeline"] > 0
    # The CPU's floor is printed beside the figures it bounds, with the instruction set, and the
    # ratio is the served p50 over that floor.
    upfront = re.search(r"floor for the linear layers alone .*: int8 ([0-9.]+) ms \((\w+)\)", stdout)
    floor = re.search(r"^int8 floor: ([0-9.]+) ms \((\w+)\)", stdout, re.MULTILINE)
    assert upfront and floor, stdout
    assert floor.group(2) == upfront.group(2) and floor.group(2) in {"onnxruntime", "openvino"}
    # The floor is the best of all its runs: never above the one measured before the rounds.
    assert float(floor.group(1)) <= float(upfront.group(1))
    assert re.search(r"^CPU instructions: \S", stdout, re.MULTILINE), stdout
    assert figures["nsfw_floor_ratio"] == pytest.approx(
        figures["nsfw_p50_ms"] / float(floor.group(1)), rel=0.02
    )
    # Every exported variant was measured inside Triton, each with its runtime and parity.
    for kind in ("onnx-fp32", "onnx-int8", "openvino-int8"):
        assert re.search(rf"^{kind}\b.*\b(onnxruntime|openvino)\b", stdout, re.MULTILINE), kind
    assert re.search(r"^served by default: \S+ \([\w-]+\): ", stdout, re.MULTILINE), stdout


@pytest.mark.usefixtures("demo_models")
def test_service_benchmark_smoke() -> None:
    stdout = run("benchmarks.service")
    figures = summary(stdout)
    assert set(figures) == {
        "added_p50_ms_512x1024", "added_p50_ms_1024x2048", "gateway_overhead_p50_ms",
        "concurrency_ratio",
    }
    assert figures["concurrency_ratio"] > 0
    # The overhead figure is the one read beside Triton's own time, printed with the plain one.
    line = re.search(r"b64 minus direct, (-?[0-9.]+) ms \(p50 minus p50 of the wall times", stdout)
    assert line, stdout
    assert float(line.group(1)) == pytest.approx(figures["gateway_overhead_p50_ms"], rel=0.01, abs=0.1)
