"""Priority levels: an interactive request's latency while batch work saturates Triton, with and
without its priority, side by side in one run.

    python -m benchmarks.priority [--smoke]

One Triton on the real repository's generation models (the demo pipeline), its diffusion config
as served but for the queue timeouts (raised: on a busy machine batch work can outwait the served
60 s, and an expired request would leave a hole in the load, not measure anything), called the
gateway's way (TritonGateway): the interactive request as a synchronous /generate makes it (the
`txt2img` ensemble), the batch work as a job worker does (step by step, the diffusion model
first), every request of one shape.

- idle: interactive requests one at a time, nothing else running;
- loaded: BATCH_CLIENTS threads keep batch work (Priority.BATCH) in flight, a pass running and
  a full pass waiting, while interactive requests go one at a time, each after a random
  pause of up to a pass (so that they arrive anywhere in the pass in progress). Sent at
  Priority.INTERACTIVE ("on") they wait for the pass in progress, then run in the next one;
  sent at Priority.BATCH ("off", both at the same priority) they wait behind the queue.

On and off take turns under the same load, and each round measures idle first, so a noisy
minute falls on all three.
`priority_interactive_ratio` is the loaded p50 "on" over the idle p50 (target at most 2.0: the
pass in progress, at most one, and its own); `priority_off_interactive_ratio` the same "off".
The interactive request shares its pass with batch work of its shape, so where a pass of
max_batch_size costs much more than a pass of one (a CPU), "on" sits near
(half a full pass + a full pass) / one alone; the run prints a full pass's time beside it.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
import urllib3
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from benchmarks.batching import cpu, metric
from benchmarks.report import Timings, print_summary, print_table
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.demo_models import DEMO_DIR, build
from export.quiet import quiet_libraries
from gateway.triton import contract
from gateway.triton.client import TritonGateway

PROMPT = "a quiet harbour at dawn"
DIFFUSION = contract.Model.DIFFUSION.value
MAX_BATCH_SIZE = text_format.Parse(
    (DEFAULT_REPOSITORY / DIFFUSION / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
).max_batch_size
# A pass running and a full pass waiting: every pass is a full one, and the batch queue (level
# 2's max_queue_size) never refuses.
BATCH_CLIENTS = 2 * MAX_BATCH_SIZE
DEADLINE_S = 1800.0  # a guard: no request here expires


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    steps: int
    requests: int  # interactive requests per side and round
    rounds: int

    def generation(self, seed: int) -> contract.Generation:
        return contract.Generation(
            prompt=f"{PROMPT}, variation {seed}", width=self.width, height=self.height,
            steps=self.steps, seed=seed,
        )


def repository(target: Path) -> Path:
    """`txt2img` and its two models; diffusion's queue policies wait up to DEADLINE_S (a request
    may shorten its queue timeout, never lengthen it)."""
    for model in (DIFFUSION, contract.Model.UPSCALER.value, contract.Model.TXT2IMG.value):
        shutil.copytree(DEFAULT_REPOSITORY / model, target / model,
                        ignore=shutil.ignore_patterns("__pycache__"))
    path = target / DIFFUSION / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for policy in config.dynamic_batching.priority_queue_policy.values():
        policy.default_timeout_microseconds = int(DEADLINE_S * 1_000_000)
    path.write_text(text_format.MessageToString(config))
    return target


def gateway_on(server: TritonServer) -> TritonGateway:
    return TritonGateway(
        server.grpc_url, server.metrics_url,
        model=contract.Model.TXT2IMG.value, nsfw_model=contract.Model.TXT2IMG_NSFW.value,
        probe_timeout_s=5, retry_after_s=1, http=urllib3.PoolManager(),
    )


@contextmanager
def batch_load(server: TritonServer, shape: Shape) -> Iterator[None]:
    """BATCH_CLIENTS threads, each sending batch work back to back as a job worker does, until
    the block ends; returns once a full pass waits in the queue."""
    stop = threading.Event()
    gateway = gateway_on(server)
    failures: list[BaseException] = []

    def client(index: int) -> None:
        seed = 10_000 * (index + 1)
        while not stop.is_set():
            seed += 1
            try:
                gateway.generate(
                    shape.generation(seed), nsfw=False, deadline_s=DEADLINE_S,
                    cancel=stop, priority=contract.Priority.BATCH,
                )
            except Exception as exc:  # noqa: BLE001 - a canceled one at the end is expected
                if not stop.is_set():
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(BATCH_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        while pending(server) < MAX_BATCH_SIZE:
            check(failures)
            time.sleep(0.05)
        yield
        check(failures)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        gateway.close()


def check(failures: list[BaseException]) -> None:
    if failures:
        raise RuntimeError(f"the batch load failed: {failures[0]!r}")


def pending(server: TritonServer) -> float:
    return metric(server.metrics_url, "nv_inference_pending_request_count", model=DIFFUSION)


def inferences(server: TritonServer) -> int:
    """Requests the diffusion model has answered (Triton's statistics)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(DIFFUSION, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0))


def pass_seconds(server: TritonServer, passes: int) -> float:
    """How long a full pass takes under the load: the time the model takes to answer `passes`
    passes' worth of requests."""
    start, started = inferences(server), time.perf_counter()
    while inferences(server) < start + passes * MAX_BATCH_SIZE:
        time.sleep(0.02)
    return (time.perf_counter() - started) / passes


def interactive(gateway: TritonGateway, shape: Shape, seed: int,
                priority: contract.Priority) -> float:
    """One generation the way a synchronous /generate asks for it; its wall time."""
    started = time.perf_counter()
    gateway.generate(shape.generation(seed), nsfw=False, deadline_s=DEADLINE_S, priority=priority)
    return time.perf_counter() - started


@quiet_libraries()
def run(smoke: bool) -> dict[str, float]:
    # Two shared cores run a pass of 8 in seconds at 64x64: the size the run can afford.
    shape = Shape(64, 64, 1, 1, 1) if smoke else Shape(64, 64, 2, 6, 2)
    build()  # the demo models, when `make models` has not run
    rng = random.Random(1234)
    sides = {"on": contract.Priority.INTERACTIVE, "off": contract.Priority.BATCH}
    timings = {name: Timings() for name in ("idle", *sides)}
    with tempfile.TemporaryDirectory() as tmp:
        # The copied config's `model` path is relative to the real repository: named here.
        server = TritonServer.on_free_ports(
            repository(Path(tmp) / "repository"), Path(tmp) / "triton",
            env={"IMAGEGEN_DIFFUSION_MODEL": str(DEMO_DIR / "diffusion")},
        )
        gateway = gateway_on(server)
        try:
            print(f"CPU: {cpu()}")
            print(f"{shape.width}x{shape.height}, {shape.steps} steps, demo pipeline; "
                  f"{BATCH_CLIENTS} batch clients; max_batch_size {MAX_BATCH_SIZE}")
            interactive(gateway, shape, 0, contract.Priority.INTERACTIVE)  # first call allocates
            seed, passes = 1, Timings()
            # Each round measures idle, then both sides under the load, so a machine that gets
            # busier or quieter during the run moves all three.
            for _ in range(shape.rounds):
                for _ in range(shape.requests):
                    timings["idle"].add(
                        interactive(gateway, shape, seed, contract.Priority.INTERACTIVE)
                    )
                    seed += 1
                with batch_load(server, shape):
                    passes.add(pass_seconds(server, 1 if smoke else 2))
                    for _ in range(shape.requests):
                        for name, priority in sides.items():
                            # Anywhere in the pass in progress.
                            time.sleep(rng.uniform(0, passes.seconds[-1]))
                            timings[name].add(interactive(gateway, shape, seed, priority))
                            seed += 1
            full_pass_s = passes.p50_ms / 1000
        finally:
            gateway.close()
            server.stop()
    idle = timings["idle"].p50_ms
    print_table(
        ["interactive request", "priority", "requests", "p50 ms", "p90 ms", "p50 / idle"],
        [
            ("Triton idle", "interactive", len(timings["idle"].seconds), idle,
             timings["idle"].p90_ms, "1.00"),
            *(("batch work saturating Triton", sides[name].name.lower(), len(t.seconds),
               t.p50_ms, t.p90_ms, f"{t.p50_ms / idle:.2f}")
              for name, t in timings.items() if name in sides),
        ],
    )
    figures = {
        "priority_interactive_ratio": timings["on"].p50_ms / idle,
        "priority_off_interactive_ratio": timings["off"].p50_ms / idle,
    }
    # The interactive request shares its pass with batch work of its shape: with priority it
    # waits for half a pass in progress on average, then runs in a full one.
    print(f"a full pass of {MAX_BATCH_SIZE} under the load: {full_pass_s * 1000:.0f} ms, "
          f"{full_pass_s * 1000 / idle:.2f}x one request alone; half a pass waited and one run "
          f"would be {1.5 * full_pass_s * 1000 / idle:.2f}x")
    print(f"interactive p50 under saturating batch work over idle: "
          f"{figures['priority_interactive_ratio']:.2f}x with its priority (target <= 2.0), "
          f"{figures['priority_off_interactive_ratio']:.2f}x at the batch work's")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, few requests")
    args = parser.parse_args(argv)
    print_summary(run(args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
