"""Where our per-image time goes, hop by hop, for the requests the peers benchmark sends.

    python -m benchmarks.peers.hops [--shape 128x128x4] [--requests 30] [--clients 1]
                                    [--py-spy SECONDS]

Starts the local stack as benchmarks/peers does (gateway defaults), sends `--requests` requests
(`b64_json`, no upscale, no NSFW check) from `--clients` closed-loop clients after a warm-up,
and reads each hop from the clocks that see it, as a mean per image over the same requests:

- the client's wall time per request;
- the gateway's own metrics (gateway_http_request_duration_seconds for /generate, and
  gateway_generate_stage_duration_seconds: total, triton, encode, hash);
- Triton's statistics per model (the `txt2img` ensemble, `diffusion`, `upscaler`): queue,
  compute input, compute infer, compute output;
- then, in this process with nothing else running, the pipeline alone at the same shape (what
  diffusion's compute infer would be without model.py around it), and the JPEG and base64 of one
  image of that shape.

The differences between nested clocks are the hops between them (HTTP and gunicorn; the view's
parsing, checks and JSON; gRPC and the tensors' trip through Triton; the ensemble's scheduling).
With `--py-spy`, py-spy (from the peers' virtualenv) also samples the gateway's worker and the
diffusion and upscaler stubs for that many seconds of a second load and prints where each
spends its time.
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.peers import env
from benchmarks.peers.driver import Shape, cpu_kind, request_for, threads_env
from benchmarks.report import print_table
from embedded.stack import LocalStack
from embedded.triton import DEFAULT_REPOSITORY
from export.demo_models import DEMO_DIR
from export.quiet import quiet_libraries
from gateway.imaging import encode_jpeg
from gateway.settings import Settings

MODELS = ("txt2img", "diffusion", "upscaler")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class Snapshot:
    gateway: dict[tuple[str, str], float]  # (metric sample name, label) -> value
    triton: dict[str, dict[str, Any]]  # model -> inference_stats
    wall: float


def gateway_metrics(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_http_request_duration_seconds_sum" and \
                    sample.labels.get("endpoint") == "/generate":
                found[("http", "sum")] = sample.value
            elif sample.name.startswith("gateway_generate_stage_duration_seconds_") and \
                    sample.name.endswith(("_sum", "_count")):
                found[(sample.labels["stage"], sample.name.rsplit("_", 1)[1])] = sample.value
    return found


def snapshot(stack: LocalStack, client: grpcclient.InferenceServerClient) -> Snapshot:
    probes = stack.gateway.env["GATEWAY_PROBE_PORT"]
    triton = {
        model: client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        for model in MODELS
    }
    return Snapshot(gateway_metrics(f"http://127.0.0.1:{probes}/metrics"), triton,
                    time.perf_counter())


def _ns(stats: dict[str, Any], phase: str) -> float:
    return int(stats["inference_stats"].get(phase, {}).get("ns", 0)) / 1e6  # ms


def load(url: str, shape: Shape, clients: int, per_client: int, first: int) -> list[float]:
    """Closed-loop clients; the wall time of every request."""
    walls: list[float] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with requests.Session() as session:
            for k in range(per_client):
                body = {**request_for(shape, first + n * per_client + k),
                        "response_format": "b64_json", "upscale": False,
                        "enable_nsfw_check": False}
                sent = time.perf_counter()
                response = session.post(url, json=body, timeout=900)
                took = time.perf_counter() - sent
                response.raise_for_status()
                with lock:
                    walls.append(took)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(walls) != clients * per_client:
        raise RuntimeError("some requests failed")
    return walls


def hops(before: Snapshot, after: Snapshot, walls: list[float]) -> list[tuple[str, float]]:
    images = len(walls)
    g = {key: after.gateway.get(key, 0.0) - before.gateway.get(key, 0.0) for key in after.gateway}

    def stage(name: str) -> float:
        return g.get((name, "sum"), 0.0) * 1000 / images

    def model(name: str, phase: str) -> float:
        return (_ns(after.triton[name], phase) - _ns(before.triton[name], phase)) / images

    wall = float(np.mean(walls)) * 1000
    http = g.get(("http", "sum"), 0.0) * 1000 / images
    total, triton = stage("total"), stage("triton")
    ensemble = model("txt2img", "success")
    parts = {name: {phase: model(name, phase) for phase in PHASES} for name in MODELS[1:]}
    inside = sum(sum(p.values()) for p in parts.values())
    return [
        ("client wall time per request", wall),
        ("  HTTP, gunicorn, Flask hooks (wall minus the request's metric)", wall - http),
        ("  the view: parse, check, JSON of the answer (request minus stage total)", http - total),
        ("  stage triton: the gRPC call, as the gateway sees it", triton),
        ("    gRPC, tensors to and from Triton (triton minus the ensemble's time)",
         triton - ensemble),
        ("    txt2img ensemble's own scheduling (ensemble minus its steps)", ensemble - inside),
        *((f"    {name} {phase}", value) for name, phases in parts.items()
          for phase, value in phases.items()),
        ("  stage encode: JPEG", stage("encode")),
        ("  stage hash: MD5", stage("hash")),
        ("  base64 and the answer's fields (total minus triton, encode, hash)",
         total - triton - stage("encode") - stage("hash")),
    ]


def batch_sizes(after: dict[str, Any], before: dict[str, Any]) -> dict[int, int]:
    """Executions of the model by batch size between two statistics."""
    def counts(stats: dict[str, Any]) -> dict[int, int]:
        return {int(b["batch_size"]): int(b["compute_infer"]["count"])
                for b in stats.get("batch_stats", [])}

    old = counts(before)
    return {size: n - old.get(size, 0) for size, n in counts(after).items()
            if n != old.get(size, 0)}


def alone(shape: Shape, runs: int, threads: int | None) -> tuple[float, float, float]:
    """The pipeline's own time per image at this shape (one image a call, as the one-client
    load), the diffusion model's conversion to uint8, and JPEG + base64, in this process."""
    import torch
    from diffusers import AutoPipelineForText2Image

    if threads:
        torch.set_num_threads(threads)
    with quiet_libraries():
        pipe = AutoPipelineForText2Image.from_pretrained(str(DEMO_DIR / "diffusion"),
                                                         local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    times, converts, jpegs = [], [], []
    quality = Settings().jpeg_quality
    for index in range(runs + 1):
        started = time.perf_counter()
        with torch.inference_mode():
            image = pipe(prompt=request_for(shape, index)["prompt"], width=shape.width,
                         height=shape.height, num_inference_steps=shape.steps,
                         generator=torch.Generator("cpu").manual_seed(index),
                         output_type="np").images[0]
        middle = time.perf_counter()
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        converted = time.perf_counter()
        encoded = encode_jpeg(pixels, quality)
        base64.b64encode(encoded.data)
        done = time.perf_counter()
        if index:  # the first call allocates
            times.append(middle - started)
            converts.append(converted - middle)
            jpegs.append(done - converted)
    return (float(np.median(times)) * 1000, float(np.median(converts)) * 1000,
            float(np.median(jpegs)) * 1000)


def stubs(stack: LocalStack) -> dict[str, int]:
    """The Python-backend stub of each model, by model name."""
    found = {}
    assert stack.triton.process is not None
    for child in psutil.Process(stack.triton.process.pid).children(recursive=True):
        line = " ".join(child.cmdline())
        for model in ("diffusion", "upscaler"):
            if f"/{model}/" in line or f"{model}_0" in line:
                found[model] = child.pid
    return found


def spy(pids: dict[str, int], seconds: int, workdir: Path) -> list[subprocess.Popen[bytes]]:
    binary = env.python().parent / "py-spy"
    return [subprocess.Popen([str(binary), "record", "--pid", str(pid), "--duration",
                              str(seconds), "--format", "raw", "--nonblocking",
                              "--output", str(workdir / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


def summarise(path: Path, top: int = 10) -> list[tuple[str, str, float]]:
    """The functions each process spends its samples in, self time, as shares."""
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        leaves[frame.split(" (")[0] + " (" + frame.split(" (")[-1].split("/")[-1]
               if " (" in frame else frame] += int(count)
    total = sum(leaves.values()) or 1
    return [(path.stem, frame[:90], 100 * n / total) for frame, n in leaves.most_common(top)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128x128x4", help="WIDTHxHEIGHTxSTEPS")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--py-spy", type=int, default=0, metavar="SECONDS")
    parser.add_argument("--gateway-setting", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--torch-threads", type=int, metavar="N",
                        help="torch threads of the diffusion model and of the pipeline alone "
                             "(OMP_NUM_THREADS); default: torch's own")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="another model repository (e.g. a copy with other model.py files)")
    args = parser.parse_args(argv)
    width, height, steps = (int(v) for v in args.shape.split("x"))
    shape = Shape(width, height, steps, 0, 0)
    per_client = max(1, args.requests // args.clients)
    settings = dict(item.split("=", 1) for item in args.gateway_setting)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    print(f"CPU: {cpu_kind()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, \
            LocalStack(Path(tmp), repository=args.repository, gateway_settings=settings,
                       # A copied repository's relative path to the demo pipeline leads nowhere.
                       triton_env={"IMAGEGEN_DIFFUSION_MODEL": str(DEMO_DIR / "diffusion"),
                                   **threads_env(args.torch_threads)}) as stack:
        url = f"{stack.gateway.url}/generate"
        client = grpcclient.InferenceServerClient(stack.triton.grpc_url)
        load(url, shape, args.clients, 2, 0)  # warm-up
        before = snapshot(stack, client)
        walls = load(url, shape, args.clients, per_client, 1000)
        time.sleep(0.5)  # Triton records statistics just after it answers
        after = snapshot(stack, client)
        rows = hops(before, after, walls)
        if args.py_spy:
            pids = {"gateway": stack.gateway.worker_pids()[0], **stubs(stack)}
            spies = spy(pids, args.py_spy, Path(tmp))
            deadline = time.monotonic() + args.py_spy
            first = 100_000
            while time.monotonic() < deadline:
                load(url, shape, args.clients, 1, first)
                first += args.clients
            for process in spies:
                process.wait(timeout=60)
            profile = [row for name in pids for row in summarise(Path(tmp) / f"{name}.txt")]
        client.close()
    print(f"{len(walls)} requests, {args.clients} client(s), {shape.width}x{shape.height}, "
          f"{shape.steps} steps; mean ms per image")
    pipeline_ms, convert_ms, jpeg_ms = alone(shape, min(10, args.requests), args.torch_threads)
    wall = rows[0][1]
    batches = batch_sizes(after.triton["diffusion"], before.triton["diffusion"])
    print("diffusion executions by batch size: "
          + ", ".join(f"{size}: {count}" for size, count in sorted(batches.items())))
    print_table(["hop", "ms", "% of wall"], [(name, ms, 100 * ms / wall) for name, ms in rows])
    print(f"alone in this process, median: the pipeline {pipeline_ms:.1f} ms an image; the "
          f"conversion to uint8 {convert_ms:.2f} ms; JPEG and base64 {jpeg_ms:.2f} ms")
    if args.py_spy:
        print_table(["process", "function (self time)", "% of samples"], profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
