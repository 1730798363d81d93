"""End-to-end figures against the real local stack (Triton, moto S3, gunicorn gateway).

    python -m benchmarks.service [--runs 30] [--seconds 20] [--smoke]

- added latency of the spec's two features: p50 of `/generate` (s3, NSFW on) minus p50 of a
  direct gRPC call of the generation-only ensemble `txt2img`, same model, size and seed, at
  512x1024 and at 1024x2048 (512x1024 upscaled);
- gateway overhead: `/generate` (b64_json, NSFW off) against the same direct call at 512x1024:
  the p50 of each call's wall time minus the time Triton spent on it (its statistics), gateway
  minus direct; both call `txt2img`, so generation and its noise cancel out;
- concurrency: 16 clients for a fixed time on a fast request (64x64, 1 step), requests per
  second through the gateway over requests per second straight to Triton, with the same
  thread-based load generator on both sides, taking turns.

Direct and gateway calls alternate run by run, so generation noise falls on both alike. The
full run scores with the ViT-B/16 classifier of benchmarks.nsfw (--smoke: the demo one).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import tritonclient.grpc as grpcclient

from benchmarks import nsfw
from benchmarks.report import Timings, print_summary, print_table
from embedded.s3 import LocalS3
from embedded.stack import LocalStack
from gateway.settings import SPARE_THREADS
from gateway.triton import contract

BUCKET = "bench"
STEPS = 2
RUNS = 30  # per call kind and size: generation varies by about ±150 ms run to run here
CLIENTS = 16
ROUNDS = 4  # turns each side takes in the concurrency measurement
SEED = 1234


def service_stack(workdir: Path, nsfw_onnx: Path | None = None) -> LocalStack:
    """Triton, moto and the gateway; `nsfw_onnx` replaces the repository's classifier."""
    return LocalStack(
        workdir,
        triton_env={"IMAGEGEN_NSFW_ONNX": str(nsfw_onnx)} if nsfw_onnx else {},
        # Room for every client: the default in-flight bound would turn the load test into 429s.
        # gunicorn keeps SPARE_THREADS beyond the bound.
        gateway_settings={"THREADS": str(CLIENTS + SPARE_THREADS), "MAX_IN_FLIGHT": str(CLIENTS)},
    )


def direct_call(client: grpcclient.InferenceServerClient, width: int, height: int, scale: int,
                steps: int = STEPS) -> Callable[[], None]:
    """A `txt2img` call exactly as the gateway makes it, image fetched back to the client."""
    inputs = contract.Generation(
        prompt="a quiet harbour at dawn", width=width, height=height, steps=steps, seed=SEED,
        scale=scale,
    ).inputs()

    def call() -> None:
        client.infer(contract.Model.TXT2IMG.value, inputs).as_numpy(contract.IMAGE.name)

    return call


def gateway_call(session: requests.Session, gateway_url: str, bucket: LocalS3, width: int,
                 height: int, upscale: bool, *, upload: bool, nsfw: bool,
                 steps: int = STEPS) -> Callable[[], None]:
    body: dict[str, Any] = {
        "prompt": "a quiet harbour at dawn",
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "seed": SEED,
        "upscale": upscale,
        "enable_nsfw_check": nsfw,
        "response_format": "s3" if upload else "b64_json",
    }
    if upload:
        body["s3_prefix"] = bucket.presign_put("bench/1.png")

    def call() -> None:
        response = session.post(f"{gateway_url}/generate", json=body, timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"/generate answered {response.status_code}: {response.text[:300]}")

    return call


def triton_seconds(client: grpcclient.InferenceServerClient, model: str) -> float:
    """Total time Triton has spent on the model's successful requests, queue included."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("ns", 0)) / 1e9


def paired(
    calls: dict[str, Callable[[], None]],
    runs: int,
    server: Callable[[str], float] | None = None,
) -> tuple[dict[str, Timings], dict[str, Timings]]:
    """Wall time of each call, alternating, and, when `server(name)` reads a clock of the time
    Triton spent on that call kind, the wall time minus that: what lies outside Triton."""
    timings = {name: Timings() for name in calls}
    outside = {name: Timings() for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(runs):
        for name, call in calls.items():
            before = server(name) if server else 0.0
            started = time.perf_counter()
            call()
            wall = time.perf_counter() - started
            timings[name].add(wall)
            if server:
                outside[name].add(wall - (server(name) - before))
    return timings, outside


def burst(calls: list[Callable[[], None]], seconds: float) -> tuple[int, float]:
    """Requests done and seconds taken by one thread per call, each calling until time is up."""
    done = [0] * len(calls)
    stop_at = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            while time.perf_counter() < stop_at:
                calls[index]()
                done[index] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    return sum(done), time.perf_counter() - started


Opener = Callable[[], tuple[Callable[[], None], Callable[[], None]]]


def throughput(openers: dict[str, Opener], seconds: float, rounds: int = ROUNDS) -> dict[str, float]:
    """Requests per second that CLIENTS threads, each with its own client, sustain on each side.

    The sides take turns in `rounds` slices of the time, so that a noisy minute on the machine
    falls on both. Each slice opens its own clients (an opener gives a call and its close): a
    keep-alive connection left idle through the other side's turn would meet the gateway's
    5 s keep-alive timeout and be reset mid-request."""
    for open_client in openers.values():  # warm-up: new shapes, first connections
        call, close = open_client()
        call()
        close()
    totals = {name: [0, 0.0] for name in openers}
    for _ in range(rounds):
        for name, open_client in openers.items():
            clients = [open_client() for _ in range(CLIENTS)]
            try:
                done, elapsed = burst([call for call, _ in clients], seconds / rounds)
            finally:
                for _, close in clients:
                    close()
            totals[name][0] += done
            totals[name][1] += elapsed
    return {name: done / elapsed for name, (done, elapsed) in totals.items()}


def run(runs: int, seconds: float, smoke: bool) -> dict[str, float]:
    width, height = (64, 128) if smoke else (512, 1024)
    # The NSFW step is most of what the two features add, so the full run scores with the
    # classifier of Falconsai's shape (the variant benchmarks.nsfw serves), not the tiny demo one.
    nsfw_onnx = None if smoke else nsfw.served_file(nsfw.prepare(smoke=False)[1])
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, service_stack(Path(tmp), nsfw_onnx) as stack:
        gateway_url, bucket = stack.gateway.url, stack.bucket(BUCKET)
        client = grpcclient.InferenceServerClient(stack.triton.grpc_url)
        session = requests.Session()
        rows = []
        txt2img, txt2img_nsfw = contract.Model.TXT2IMG.value, contract.Model.TXT2IMG_NSFW.value
        ensemble = {"direct": txt2img, "s3+nsfw": txt2img_nsfw, "b64": txt2img}
        overhead_wall = 0.0
        for scale, label in ((1, f"{width}x{height}"), (2, f"{width * 2}x{height * 2}")):
            timings, outside = paired(
                {
                    "direct": direct_call(client, width, height, scale),
                    "s3+nsfw": gateway_call(session, gateway_url, bucket, width, height, scale == 2,
                                            upload=True, nsfw=True),
                    "b64": gateway_call(session, gateway_url, bucket, width, height, scale == 2,
                                        upload=False, nsfw=False),
                },
                runs,
                server=lambda name: triton_seconds(client, ensemble[name]),
            )
            base = timings["direct"].p50_ms
            direct = np.asarray(timings["direct"].seconds)
            rows += [
                (label, name, t.p50_ms, t.p50_ms - base,
                 float(np.median(np.asarray(t.seconds) - direct)) * 1000, outside[name].p50_ms)
                for name, t in timings.items()
            ]
            size = "512x1024" if scale == 1 else "1024x2048"
            figures[f"added_p50_ms_{size}"] = timings["s3+nsfw"].p50_ms - base
            if scale == 1:
                # The same ensemble on both sides, so its time cancels out exactly: what is left
                # is the gateway's own work, which a ±150 ms generation would otherwise drown.
                figures["gateway_overhead_p50_ms"] = outside["b64"].p50_ms - outside["direct"].p50_ms
                overhead_wall = timings["b64"].p50_ms - base
        print(f"Latency, {runs} alternating runs each, {STEPS} steps, generated {width}x{height}, "
              f"NSFW classifier: {nsfw_onnx or 'the repository default'}")
        # The figures are p50 minus p50. Beside them: the median of the run-by-run differences,
        # and the p50 of each call's wall time minus the time Triton spent on it (from its
        # statistics), which generation noise does not reach.
        print_table(
            ["output", "call", "p50 ms", "minus direct ms", "median paired Δ ms",
             "outside Triton p50 ms"],
            rows,
        )
        print(f"gateway overhead at {width}x{height}: p50 of the time outside Triton, b64 minus "
              f"direct, {figures['gateway_overhead_p50_ms']:.1f} ms (p50 minus p50 of the wall "
              f"times: {overhead_wall:.1f} ms)")

        def fast_direct() -> tuple[Callable[[], None], Callable[[], None]]:
            triton = grpcclient.InferenceServerClient(stack.triton.grpc_url)
            return direct_call(triton, 64, 64, 1, steps=1), triton.close

        def fast_gateway() -> tuple[Callable[[], None], Callable[[], None]]:
            http = requests.Session()
            call = gateway_call(http, gateway_url, bucket, 64, 64, False, upload=False, nsfw=False,
                                steps=1)
            return call, http.close

        rps = throughput({"triton": fast_direct, "gateway": fast_gateway}, seconds)
        triton_rps, gateway_rps = rps["triton"], rps["gateway"]
        print(f"Concurrency, {CLIENTS} clients x {seconds:g}s, 64x64, 1 step: "
              f"Triton alone {triton_rps:.1f} req/s, through the gateway {gateway_rps:.1f} req/s")
        figures["concurrency_ratio"] = gateway_rps / triton_rps
        client.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--seconds", type=float, default=20.0, help="per side of the load test")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 runs, 2 s load")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.seconds = 2, 2.0
    print_summary(run(args.runs, args.seconds, args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
