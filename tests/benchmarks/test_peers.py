"""The peers benchmark's smoke run: our service, LitServe, Ray Serve and BentoML each answer one
short round at one tiny shape, and the summary has both ratios against every peer, finite.

On a fresh machine the run installs the peers' virtualenv itself (benchmarks/peers/env.py: about
a minute here, once), then starts every server (about 75 s on two busy cores)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from benchmarks.peers.driver import PEERS, SMOKE_SHAPES
from tests.benchmarks.test_smoke import PROJECT_ROOT, summary


@pytest.mark.usefixtures("demo_models")
def test_peers_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--smoke"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    figures = summary(stdout)
    [shape] = (s.label for s in SMOKE_SHAPES)
    assert set(figures) == {
        f"peer_{figure}_ratio_{peer}_{shape}" for figure in ("throughput", "p50") for peer in PEERS
    }
    assert all(math.isfinite(value) and value > 0 for value in figures.values()), figures
    # Every server answered both loads with checked JPEGs, each row its images and rate.
    for server in ("ours", *PEERS):
        for clients, images in ((8, 8), (1, 1)):
            row = rf"^{shape}\s+{clients}\s+{server}\s+{images}\s+[0-9.]+\s"
            assert re.search(row, stdout, re.MULTILINE), (server, clients, stdout)
    # The throughput figure is the median of the rounds' ratios, printed beside it.
    for peer in PEERS:
        line = re.search(rf"^{shape} vs {peer}: .* median ([0-9.]+)", stdout, re.MULTILINE)
        assert line, stdout
        assert float(line.group(1)) == pytest.approx(
            figures[f"peer_throughput_ratio_{peer}_{shape}"], rel=0.01, abs=0.006
        )
