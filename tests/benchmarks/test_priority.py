"""The priority benchmark runs at tiny sizes and prints its summary lines beside what they rest
on: the CPU, the three sides' table rows and a full pass's time."""

from __future__ import annotations

import math
import re

import pytest

from tests.benchmarks.test_smoke import run, summary


@pytest.mark.usefixtures("demo_models")
def test_priority_benchmark_smoke() -> None:
    stdout = run("benchmarks.priority")
    figures = summary(stdout)
    assert set(figures) == {"priority_interactive_ratio", "priority_off_interactive_ratio"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert re.search(r"^CPU: \S", stdout, re.MULTILINE), stdout
    for side in (r"Triton idle\s+interactive", r"saturating Triton\s+interactive",
                 r"saturating Triton\s+batch"):
        assert re.search(rf"^[\w ]*{side}\s+\d+\s+[0-9.]+\s", stdout, re.MULTILINE), side
    assert re.search(r"^a full pass of \d+ under the load: \d+ ms", stdout, re.MULTILINE), stdout
