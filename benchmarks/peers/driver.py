"""Our service beside LitServe, Ray Serve and BentoML serving the same pipeline, in one run.

    python -m benchmarks.peers [--smoke] [--all] [--rounds N] [--peers litserve ray bentoml]

Every server runs on this machine at once, each with the pipeline our diffusion model serves
(`make models`: the random-weight demo pipeline; `--pipeline sd`: the SD-1.5-shaped UNet of
benchmarks/batching.py) and the batching our diffusion model has (max_batch_size 8, 5 ms):

- ours: Triton, the local S3 and the gateway as benchmarks/service.py starts them
  (embedded.stack.LocalStack with the gateway's default settings), called at gunicorn's port
  with `response_format: b64_json`, `upscale: false`, `enable_nsfw_check: false`;
- the peers (benchmarks/peers/*_app.py), in their own virtualenv (benchmarks/peers/env.py),
  each answering the same JSON with the same JPEG, base64, and its MD5.

The load is closed-loop: each client thread, with its own connection, sends its next request
when its last one is answered; every request has its own prompt and seed, all of one round the
same shape. For each shape the sides take turns in rounds, 8 clients then one client, the order
rotating each round, so a noisy minute on a shared machine falls on all of them. Throughput is
images over the burst's wall time; the figures are ours over theirs:

- `peer_throughput_ratio_<peer>_<shape>`: at 8 clients, the median of the rounds' ratios
  (above 1: we serve more images a second);
- `peer_p50_ratio_<peer>_<shape>`: at one client, p50 over p50, pooled over the rounds
  (below 1: we answer sooner).

Beside them each side's CPU seconds per image (its whole process tree, during its own turns) and
its idle load during the others' turns, which falls on whoever is measured then.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from PIL import Image

from benchmarks.peers import env, pipeline
from benchmarks.report import print_summary, print_table
from embedded.process import ManagedProcess, ProcessStartError, free_port
from embedded.stack import LocalStack
from embedded.triton import DEFAULT_REPOSITORY, PROJECT_ROOT
from export.demo_models import DEMO_DIR
from gateway.settings import Settings

PEERS = ("litserve", "ray", "bentoml")
CLIENTS = 8
SEED = 1234
PROMPT = "a quiet harbour at dawn"
REQUEST_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    steps: int
    per_client_8: int  # requests each of 8 clients sends in a round
    per_client_1: int  # requests the one client sends in a round

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}_{self.steps}"


# The default run: tiny to the spec's steps at half its size, about 12 minutes on 2 cores.
SHAPES = (
    Shape(128, 128, 4, 6, 6),
    Shape(256, 256, 8, 2, 3),
    Shape(512, 512, 15, 2, 2),
)
# --all adds the spec's 512x1024 at 15 steps: a batch of 8 takes about a minute on 2 cores.
ALL_SHAPES = (*SHAPES, Shape(512, 1024, 15, 1, 1))
SMOKE_SHAPES = (Shape(64, 64, 2, 1, 1),)
# --pipeline sd: the SD-1.5-shaped UNet at the size benchmarks/batching.py measures it.
SD_SHAPES = (Shape(128, 128, 2, 1, 1),)


def threads_env(threads: int | None) -> dict[str, str]:
    """torch's intra-op threads for a server, through the variable torch reads at start."""
    return {} if not threads else {"OMP_NUM_THREADS": str(threads)}


def diffusion_batching() -> tuple[int, float]:
    """max_batch_size and max_queue_delay (s) of our diffusion model, which the peers get too."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (DEFAULT_REPOSITORY / "diffusion" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds / 1e6


class PeerProcess(ManagedProcess):
    """One peer's server, run by the peers' interpreter from the project root."""

    cwd = PROJECT_ROOT
    ready_timeout_s = 300.0

    def __init__(self, name: str, command: list[str], environ: dict[str, str], ready_url: str,
                 url: str, log_path: Path) -> None:
        self.name = name
        self._command = command
        self._env = environ
        self._ready_url = ready_url
        self.url = url
        self.log_path = log_path
        self.process = None

    def command(self) -> list[str]:
        return self._command

    def environment(self) -> dict[str, str]:
        return self._env

    @property
    def ready_url(self) -> str:
        return self._ready_url

    def is_ready(self) -> bool:
        if self.name != "ray":
            return super().is_ready()
        # Serve's proxy answers before the deployment is up: ready once the route is there.
        try:
            return "/generate" in requests.get(self._ready_url, timeout=2).json()
        except (requests.RequestException, ValueError):
            return False

    def stop(self, timeout: float | None = None) -> int | None:
        # Ray and BentoML start helpers of their own (raylet, GCS, workers; circus' watchers):
        # whatever of them is left after the graceful stop goes too.
        pids = _tree(self.process.pid) if self.process else []
        code = super().stop(timeout)
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        return code


def peer_process(name: str, python: Path, environ: dict[str, str], workdir: Path) -> PeerProcess:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "litserve":
        command = [str(python), "-m", "benchmarks.peers.litserve_app", str(port)]
        ready = f"{url}/health"
    elif name == "ray":
        command = [str(python), "-m", "benchmarks.peers.ray_app", str(port)]
        ready = f"{url}/-/routes"
    else:
        command = [str(python), "-m", "bentoml", "serve", "benchmarks.peers.bentoml_app:Diffusion",
                   "--host", "127.0.0.1", "--port", str(port)]
        ready = f"{url}/readyz"
    return PeerProcess(name, command, environ, ready, url, workdir / f"{name}.log")


def _tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def cpu_seconds(roots: list[int]) -> float:
    """User and system CPU time of the processes under `roots` (their live children included)."""
    total = 0.0
    for pid in {p for root in roots for p in _tree(root)}:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


@dataclass
class Side:
    """A server under test: where to send a request, and how its answer reads."""

    name: str
    url: str
    body: Callable[[dict[str, Any]], Any]
    read: Callable[[Any], dict[str, str]]
    roots: Callable[[], list[int]]
    cpu_own: float = 0.0
    images_own: int = 0
    seconds_own: float = 0.0


@dataclass
class Burst:
    images: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.images / self.seconds


def request_for(shape: Shape, index: int) -> dict[str, Any]:
    return {"prompt": f"{PROMPT}, variation {index}", "width": shape.width,
            "height": shape.height, "num_inference_steps": shape.steps, "seed": SEED + index}


def check_answer(shape: Shape, answer: dict[str, str], side: str) -> None:
    data = base64.b64decode(answer["b64_json"], validate=True)
    if hashlib.md5(data, usedforsecurity=False).hexdigest() != answer["image_hash"]:
        raise RuntimeError(f"{side}: image_hash is not the MD5 of the JPEG")
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG" or image.size != (shape.width, shape.height):
            raise RuntimeError(f"{side}: {image.format} {image.size}, expected a "
                               f"{shape.width}x{shape.height} JPEG")


def burst(side: Side, shape: Shape, clients: int, per_client: int, first_index: int) -> Burst:
    """`clients` threads, each with its own connection, sending `per_client` requests one after
    the other; every answer is checked after the clock stops."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answers: list[list[Any]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    sessions = [requests.Session() for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        try:
            start.wait()
            for k in range(per_client):
                body = side.body(request_for(shape, first_index + n * per_client + k))
                sent = time.perf_counter()
                response = sessions[n].post(side.url, json=body, timeout=REQUEST_TIMEOUT_S)
                latencies[n].append(time.perf_counter() - sent)
                if response.status_code != 200:
                    raise RuntimeError(f"{side.name} answered {response.status_code}: "
                                       f"{response.text[:300]}")
                answers[n].append(response.json())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before = cpu_seconds(side.roots())
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    side.cpu_own += cpu_seconds(side.roots()) - cpu_before
    for session in sessions:
        session.close()
    if errors:
        raise RuntimeError(f"{side.name}: {errors[0]}") from errors[0]
    for answer in (a for per in answers for a in per):
        check_answer(shape, side.read(answer), side.name)
    images = clients * per_client
    side.images_own += images
    side.seconds_own += elapsed
    return Burst(images, elapsed, [s for per in latencies for s in per])


@dataclass
class Results:
    # (shape label, clients, side) -> one burst per round
    bursts: dict[tuple[str, int, str], list[Burst]] = field(default_factory=dict)

    def add(self, shape: Shape, clients: int, side: str, result: Burst) -> None:
        self.bursts.setdefault((shape.label, clients, side), []).append(result)

    def throughput(self, shape: str, clients: int, side: str) -> float:
        runs = self.bursts[(shape, clients, side)]
        return sum(b.images for b in runs) / sum(b.seconds for b in runs)

    def p50_ms(self, shape: str, clients: int, side: str) -> float:
        runs = self.bursts[(shape, clients, side)]
        return float(np.percentile([s for b in runs for s in b.latencies], 50)) * 1000

    def round_ratios(self, shape: str, peer: str) -> list[float]:
        ours, theirs = self.bursts[(shape, CLIENTS, "ours")], self.bursts[(shape, CLIENTS, peer)]
        return [a.throughput / b.throughput for a, b in zip(ours, theirs)]


def measure(sides: list[Side], shapes: tuple[Shape, ...], rounds: int, warm: bool) -> Results:
    results = Results()
    index = 0
    # BentoML's dispatcher trains its cost model on its first 11 batches (most of them of one
    # request); every side gets the same warm-up, and each shape a first burst of its own.
    for side in sides if warm else ():
        burst(side, shapes[0], CLIENTS, 3, index)
        index += CLIENTS * 3
    for shape in shapes:
        for side in sides if warm else ():
            burst(side, shape, CLIENTS, 1, index)
            index += CLIENTS
        started = time.perf_counter()
        for round_ in range(rounds):
            order = sides[round_ % len(sides):] + sides[:round_ % len(sides)]
            for clients, per_client in ((CLIENTS, shape.per_client_8), (1, shape.per_client_1)):
                for side in order:
                    results.add(shape, clients, side.name,
                                burst(side, shape, clients, per_client, index))
                    index += clients * per_client
        print(f"{shape.label}: {rounds} round(s) in {time.perf_counter() - started:.0f} s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return results


def our_side(stack: LocalStack, name: str = "ours") -> Side:
    def body(request: dict[str, Any]) -> dict[str, Any]:
        return {**request, "response_format": "b64_json", "upscale": False,
                "enable_nsfw_check": False}

    def roots() -> list[int]:
        parts = (stack.triton, stack.gateway, stack.front_door, stack.s3)
        return [part.process.pid for part in parts if part.process is not None]

    return Side(name, f"{stack.gateway.url}/generate", body, lambda r: r["data"], roots)


def peer_side(process: PeerProcess) -> Side:
    if process.name == "bentoml":
        # The batchable endpoint takes a list: one request is a one-item list, answered as one.
        return Side("bentoml", f"{process.url}/generate", lambda r: {"requests": [r]},
                    lambda r: r[0], lambda: [process.process.pid] if process.process else [])
    return Side(process.name, f"{process.url}/generate", lambda r: r, lambda r: r,
                lambda: [process.process.pid] if process.process else [])


def cpu_kind() -> str:
    from benchmarks.batching import cpu

    return cpu()


def report(results: Results, sides: list[Side], shapes: tuple[Shape, ...], seconds: float,
           idle: dict[str, float]) -> dict[str, float]:
    rows = []
    for shape in shapes:
        for clients in (CLIENTS, 1):
            for side in sides:
                key = (shape.label, clients, side.name)
                runs = results.bursts[key]
                rows.append((shape.label, clients, side.name, sum(b.images for b in runs),
                             f"{results.throughput(*key):.3f}", results.p50_ms(*key),
                             float(np.percentile([s for b in runs for s in b.latencies], 90))
                             * 1000))
    print_table(["shape", "clients", "server", "images", "images/s", "p50 ms", "p90 ms"], rows)
    print("CPU per image (each side's processes, its own turns) and idle load (the others' "
          "turns):")
    others = {side.name: seconds - side.seconds_own for side in sides}
    print_table(["server", "CPU s/image", "idle CPU %"],
                [(side.name, f"{side.cpu_own / max(side.images_own, 1):.3f}",
                  100 * idle[side.name] / max(others[side.name], 1e-9)) for side in sides])
    figures: dict[str, float] = {}
    for shape in shapes:
        for side in sides[1:]:
            ratios = results.round_ratios(shape.label, side.name)
            pooled = (results.throughput(shape.label, CLIENTS, "ours")
                      / results.throughput(shape.label, CLIENTS, side.name))
            p50 = results.p50_ms(shape.label, 1, "ours") / results.p50_ms(shape.label, 1, side.name)
            if side.name in PEERS:  # ours_before is a reference, not a peer
                figures[f"peer_throughput_ratio_{side.name}_{shape.label}"] = \
                    statistics.median(ratios)
                figures[f"peer_p50_ratio_{side.name}_{shape.label}"] = p50
            print(f"{shape.label} vs {side.name}: throughput ours/theirs by round "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}: median {statistics.median(ratios):.2f},"
                  f" pooled {pooled:.2f}; one client p50 ours/theirs {p50:.2f}")
    return figures


@contextmanager
def servers(peers: tuple[str, ...], workdir: Path, model: Path,
            gateway_settings: dict[str, str], triton_env: dict[str, str],
            baseline: Path | None = None, torch_threads: int | None = None
            ) -> Iterator[list[Side]]:
    python = env.ensure()
    max_batch_size, delay_s = diffusion_batching()
    quality = Settings.from_env({**gateway_settings_env(gateway_settings)}).jpeg_quality
    environ = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        pipeline.PIPELINE_ENV: str(model),
        pipeline.QUALITY_ENV: str(quality),
        pipeline.MAX_BATCH_SIZE_ENV: str(max_batch_size),
        pipeline.BATCH_TIMEOUT_ENV: str(delay_s),
        # Nothing phones home from these machines: no usage reports, no telemetry.
        "BENTOML_DO_NOT_TRACK": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "LITSERVE_DISABLE_TELEMETRY": "1",
        "RAY_TMPDIR": str(workdir / "ray"),
        # Ray sets its workers' OMP_NUM_THREADS from num_cpus only where it is not set already.
        **threads_env(torch_threads),
        "BENTOML_HOME": str(workdir / "bentoml"),
    }
    (workdir / "ray").mkdir()
    with ExitStack() as stack:
        processes = [peer_process(name, python, environ, workdir) for name in peers]
        # One at a time, Ray first: Ray gives its node a fixed 30 s to register, which a busy
        # machine loading four servers' worth of torch at once does not always leave it.
        for process in sorted(processes, key=lambda p: p.name != "ray"):
            stack.callback(process.stop)
            process.start()
            try:
                process.wait_ready()
            except ProcessStartError as exc:
                tail = process.log_path.read_text(errors="replace")[-3000:]
                raise ProcessStartError(f"{exc}\n{tail}") from exc
        ours = stack.enter_context(LocalStack(workdir / "ours", gateway_settings=gateway_settings,
                                              triton_env=triton_env, gateway_log=True))
        before = None if baseline is None else stack.enter_context(LocalStack(
            workdir / "ours_before", repository=baseline, gateway_settings=gateway_settings,
            triton_env={"IMAGEGEN_DIFFUSION_MODEL": str(model), **triton_env}))
        print(f"ours: gateway {ours.gateway.url} ({describe_gateway(ours)}); "
              + "; ".join(f"{p.name} {p.url}" for p in processes), flush=True)
        print(f"batching everywhere: max_batch_size {max_batch_size}, wait {delay_s * 1000:g} ms; "
              f"JPEG quality {quality}", flush=True)
        extra = [] if before is None else [our_side(before, "ours_before")]
        yield [our_side(ours), *(peer_side(p) for p in processes), *extra]


def gateway_settings_env(settings: dict[str, str]) -> dict[str, str]:
    return {f"GATEWAY_{name}": value for name, value in settings.items()}


def describe_gateway(stack: LocalStack) -> str:
    settings = Settings.from_env({k: v for k, v in stack.gateway.env.items()
                                  if k.startswith("GATEWAY_")})
    return (f"{settings.workers} worker(s), {settings.threads} threads, "
            f"MAX_IN_FLIGHT {settings.max_in_flight}")


def run(smoke: bool = False, all_shapes: bool = False, rounds: int | None = None,
        peers: tuple[str, ...] = PEERS, gateway_settings: dict[str, str] | None = None,
        sd: bool = False, only: tuple[Shape, ...] = (), baseline: Path | None = None,
        torch_threads: int | None = None) -> dict[str, float]:
    if sd:
        from benchmarks.batching import SD15_UNET, build_sd_shaped
        from benchmarks.nsfw import BENCH_DIR

        model = build_sd_shaped(BENCH_DIR / "sd15-unet", SD15_UNET)
        shapes = SD_SHAPES
    else:
        model = DEMO_DIR / "diffusion"
        shapes = SMOKE_SHAPES if smoke else ALL_SHAPES if all_shapes else SHAPES
    shapes = only or shapes
    rounds = rounds or (1 if smoke else 3)
    triton_env = {**({"IMAGEGEN_DIFFUSION_MODEL": str(model)} if sd else {}),
                  **threads_env(torch_threads)}
    print(f"CPU: {cpu_kind()}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            servers(peers, Path(tmp), model, gateway_settings or {}, triton_env,
                    baseline, torch_threads) as sides:
        print(f"servers up in {time.perf_counter() - started:.0f} s", flush=True)
        cpu_start = {side.name: cpu_seconds(side.roots()) for side in sides}
        measured = time.perf_counter()
        results = measure(sides, shapes, rounds, warm=not smoke)
        seconds = time.perf_counter() - measured
        idle = {side.name: cpu_seconds(side.roots()) - cpu_start[side.name] - side.cpu_own
                for side in sides}
        figures = report(results, sides, shapes, seconds, idle)
    print(f"peers benchmark: {time.perf_counter() - started:.0f} s in all", flush=True)
    return figures


def parse_shape(text: str) -> Shape:
    """WIDTHxHEIGHTxSTEPS, with the default run's requests per client when it has that shape."""
    width, height, steps = (int(v) for v in text.split("x"))
    known = {(s.width, s.height, s.steps): s for s in (*ALL_SHAPES, *SMOKE_SHAPES)}
    return known.get((width, height, steps), Shape(width, height, steps, 1, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, one short round")
    parser.add_argument("--all", action="store_true", help="add the spec's 512x1024, 15 steps")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="WxHxSTEPS",
                        help="these shapes instead")
    parser.add_argument("--baseline-repository", type=Path, metavar="PATH",
                        help="also run our service on this model repository (a copy with the "
                             "model.py files before a change), as the side ours_before")
    parser.add_argument("--rounds", type=int, help="rounds per shape (default 3; smoke 1)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--pipeline", choices=["demo", "sd"], default="demo",
                        help="sd: the SD-1.5-shaped UNet of benchmarks/batching.py (3.4 GB a "
                             "server), 128x128, 2 steps")
    parser.add_argument("--torch-threads", type=int, metavar="N",
                        help="torch threads of every server's pipeline (OMP_NUM_THREADS); "
                             "default: each one's own (one per core). 1 on a machine whose "
                             "cores other work oversubscribes: OpenMP's waits then cost more "
                             "than the second thread gains")
    parser.add_argument("--gateway-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a GATEWAY_ setting (without the prefix) for our gateway")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.gateway_setting)
    # A stop signal unwinds like an error, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    print_summary(run(args.smoke, args.all, args.rounds, tuple(args.peers), settings,
                      args.pipeline == "sd", tuple(args.shapes or ()), args.baseline_repository,
                      args.torch_threads))
    return 0
