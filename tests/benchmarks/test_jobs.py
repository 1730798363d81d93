"""The jobs benchmark at tiny sizes prints its three summary lines, and the jobs' load run (which
shares its webhook receiver and its stack) passes with a small backlog."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.benchmarks.test_smoke import PROJECT_ROOT, run, summary


@pytest.mark.usefixtures("demo_models")
def test_jobs_benchmark_smoke() -> None:
    stdout = run("benchmarks.jobs")
    figures = summary(stdout)
    assert set(figures) == {"jobs_submit_per_s", "jobs_overhead_p50_ms", "jobs_throughput_ratio"}
    assert all(math.isfinite(value) for value in figures.values()), figures
    assert figures["jobs_submit_per_s"] > 0 and figures["jobs_throughput_ratio"] > 0
    # The figures name the machine, and the overhead comes with where a job's time went.
    assert re.search(r"^CPU: \S", stdout, re.MULTILINE), stdout
    for part in ("queued (created to started)", "webhook (completed to arrival)"):
        assert re.search(rf"^  job {re.escape(part)}\s+-?[0-9.]+\s", stdout, re.MULTILINE), stdout


@pytest.mark.usefixtures("demo_models")
def test_jobs_load_run_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.jobs_load", "--jobs", "12", "--workers", "2"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The backlog was all queued before any worker ran, then all of it ran.
    assert "queued: 12 in the store's queued set, 12 in the broker's queue" in result.stdout
    assert "all 12 jobs succeeded, none lost" in result.stdout
    for moment in ("before", "queued", "after"):
        assert re.search(rf"^{moment}:\s+Redis used_memory [0-9.]+ MiB .* gateway RSS [0-9.]+ MiB",
                         result.stdout, re.MULTILINE), result.stdout
