"""The Triton autoscaling signal, measured (harness/scaling_signal.py): a real Prometheus,
with deploy/prometheus/kubernetes.yml's triton job and the recording rule, scrapes the session's
Triton (one diffusion instance) while three passes' worth of clients (diffusion batches up to
its max_batch_size requests into one pass) call txt2img back to back, then stop. The
ratio the HPA would read through prometheus-adapter's query must rise above the HPA's target
under load and fall below it once the load stops.

Shortened so it fits `make test`: 1 s scrapes and evaluations, the rule's 1 m windows cut to
20 s, and the load stops once the ratio was above the target in 3 samples in a row (at most
90 s: generations slow down when other work shares the 2 cores, and Triton counts a request's
queue and compute time when it completes). `python -m harness.scaling_signal` measures the
shipped rule as is, with fixed phases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import scaling_signal
from tests.deploy.tools import require


def test_queue_pressure_crosses_the_hpa_target_and_back(triton: Any, tmp_path: Path) -> None:
    metrics = f"{triton.host}:{triton.metrics_port}"
    with scaling_signal.prometheus_on(
        require("prometheus"), tmp_path, metrics, "20s", "1s"
    ) as prom:
        result = scaling_signal.measure(
            prom, triton.grpc_url, clients=scaling_signal.saturating_clients(), load_s=90, cool_s=75, sample_s=2, enough_above=3
        )
    print(scaling_signal.summary(result))
    shown = "\n".join(f"{s.t:6.1f}s {s.phase} {s.ratio}" for s in result.samples)
    # The relabelling of the Kubernetes scrape config: the ready endpoint is scraped with its
    # pod's name, the not-ready one is dropped.
    assert result.scraped == [scaling_signal.POD]
    assert result.dropped == 1
    assert result.errors == []
    load, cool = result.values("load"), result.values("cool")
    assert load and cool, shown
    # Three passes' worth of callers on one instance: about two passes wait behind the running
    # one (each request's compute is its whole pass's), so the ratio nears 2.
    assert max(load) > result.target, shown
    assert result.first_time("load", above=True) is not None, shown
    assert cool[-1] < result.target, shown
