"""The batching benchmark and the GPU script run at tiny sizes and print their summary lines."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.benchmarks.test_smoke import PROJECT_ROOT, run, summary
from tests.models.helpers import BATCH_PIXEL_TOLERANCE


@pytest.mark.usefixtures("demo_models")
def test_batching_benchmark_smoke() -> None:
    stdout = run("benchmarks.batching")
    figures = summary(stdout)
    assert set(figures) == {
        "batch_throughput_ratio_demo", "batch_single_p50_ratio_demo",
        "batch_throughput_ratio_sd", "batch_single_p50_ratio_sd",
    }
    assert all(value > 0 for value in figures.values()), figures
    # perf_analyzer's rows for both models, both sides, 8 clients and one.
    rows = re.findall(r"^(demo|sd)\s+\d+x\d+\s+\d+\s+(8|1)\s+(off|on)\s", stdout, re.MULTILINE)
    assert len(set(rows)) == 8, stdout
    # The reproducibility check compared images that really shared one execution of 8.
    for name in ("demo", "sd"):
        line = re.search(rf"^{name}: alone vs in a batch of 8 \(Triton ran \{{1: 1, 8: 1\}}\): "
                         r"largest pixel difference (\d+)/255", stdout, re.MULTILINE)
        assert line, stdout
        assert int(line.group(1)) <= BATCH_PIXEL_TOLERANCE, line.group(0)


def test_gpu_script_runs_in_its_cpu_mode() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--runs", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = summary(result.stdout)
    assert set(figures) == {
        "gpu_unet_step_ms_b1", "gpu_unet_step_ms_b2", "gpu_unet_step_ms_b4", "gpu_unet_step_ms_b8",
        "gpu_unet_batch8_speedup", "gpu_vit_ms_per_image_b1", "gpu_vit_ms_per_image_b8",
    }
    assert all(value > 0 for value in figures.values()), figures
