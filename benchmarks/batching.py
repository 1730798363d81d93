"""Diffusion batching: Triton's dynamic batching off and on, side by side in one run.

    python -m benchmarks.batching [--only demo|sd] [--smoke] [--reproducibility WxHxSTEPS]

Two pipelines: the demo one of `make models`, and one whose UNet has Stable Diffusion 1.5's
block shapes (diffusers' UNet2DConditionModel with SD 1.5's config values, 860M parameters,
random weights) beside a text encoder of SD's width (768) but one layer and the demo VAE, so that
the UNet is most of the work; it is built once into models/bench/ (--smoke: the same blocks,
narrow). One generated repository serves each twice from the same tritonserver binary and the
same model.py: `<name>_off` with max_batch_size 1 (one request per execution, as before
batching) and `<name>_on` with the repository's diffusion config as it is.

Triton's own perf_analyzer (benchmarks.perf_analyzer) is the load: CLIENTS concurrent clients
sending requests of one shape, each with its own prompt and seed; off and on take turns in short
rounds, so that a noisy minute on a shared machine falls on both. Then one client alone, off and
on taking turns again. Throughput is requests over the measured wall time; the throughput ratio
is the median of the rounds' on/off ratios (the pooled one is printed beside it); p50 and p95
are per request, pooled over the rounds.

perf_analyzer does not hand the images back, so the reproducibility check uses tritonclient:
each seed alone on `_off`, then the same requests queued together on `_on` (behind one longer
request, so that they leave the queue as one batch) and compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import queue
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2

import imagegen_contract
from benchmarks import ceiling
from benchmarks.gpu import SD15_UNET
from benchmarks.nsfw import BENCH_DIR
from benchmarks.perf_analyzer import Measurement, PerfAnalyzer
from benchmarks.report import print_summary, print_table
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.demo_models import DEMO_DIR
from export.quiet import quiet_libraries
from gateway.triton import contract

CLIENTS = 8
PROMPT = "a quiet harbour at dawn"
SEED = 1234
DIFFUSION = contract.Model.DIFFUSION.value

# --smoke: the same blocks, narrow, so that the script's every path runs in seconds.
SD15_UNET_NARROW = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
                    "norm_num_groups": 8}


@dataclass(frozen=True)
class Workload:
    """One pipeline and the request shape all clients send it."""

    name: str
    pipeline: Path
    width: int
    height: int
    steps: int
    requests: int  # per round, from CLIENTS clients
    single_requests: int  # per round, from one client
    rounds: int  # turns each side takes: many short ones, so that a noisy minute falls on both

    def generation(self, index: int, steps: int | None = None) -> contract.Generation:
        return contract.Generation(
            prompt=f"{PROMPT}, variation {index}", width=self.width, height=self.height,
            steps=steps or self.steps, seed=SEED + index,
        )

    def input_data(self) -> dict[str, object]:
        """perf_analyzer's --input-data: one entry per client, the batch dimension left out."""
        entries = []
        for index in range(CLIENTS):
            arrays = self.generation(index).arrays(upscaler=False)
            entries.append({
                name: {
                    "content": [v.decode() if isinstance(v, bytes) else v.item()
                                for v in array.reshape(-1)],
                    "shape": list(array.shape[1:]),
                }
                for name, array in arrays.items()
            })
        return {"data": entries}


def build_sd_shaped(target: Path, unet_config: dict[str, Any]) -> Path:
    """The demo pipeline with an SD-1.5-shaped UNet and a text encoder of SD's width."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (target / "model_index.json").exists():
        return target
    print(f"building {target.name}: UNet2DConditionModel with SD 1.5's blocks, random weights",
          flush=True)
    demo = StableDiffusionPipeline.from_pretrained(str(DEMO_DIR / "diffusion"), local_files_only=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    text = demo.text_encoder.config
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=unet_config["cross_attention_dim"],
        intermediate_size=4 * unet_config["cross_attention_dim"],
        num_attention_heads=12,
        num_hidden_layers=1,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    ))
    pipe = StableDiffusionPipeline(
        vae=demo.vae, text_encoder=text_encoder, tokenizer=demo.tokenizer, unet=unet,
        scheduler=demo.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    work = target.with_name(target.name + ".tmp")
    # Stored in fp16 (half the disk); the model loads it as fp32 on a CPU instance.
    pipe.to(torch.float16).save_pretrained(str(work), safe_serialization=True)
    work.rename(target)
    return target


def repository(target: Path, pipelines: dict[str, Path]) -> Path:
    """`<name>_off` and `<name>_on` per pipeline, from the repository's diffusion config."""
    source = DEFAULT_REPOSITORY / DIFFUSION
    text = (source / "config.pbtxt").read_text()
    for name, folder in pipelines.items():
        for batching in (False, True):
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
            config.name = f"{name}_{'on' if batching else 'off'}"
            config.parameters["model"].string_value = str(folder)
            # Eight queued SD-shaped requests can outwait the served 60 s on two busy cores; an
            # expired request would end the measurement, not measure anything.
            batcher = config.dynamic_batching
            for policy in (batcher.default_queue_policy, *batcher.priority_queue_policy.values()):
                policy.default_timeout_microseconds = 600_000_000
            if not batching:
                config.max_batch_size = 1
                config.dynamic_batching.ClearField("max_queue_delay_microseconds")
            (target / config.name).mkdir(parents=True)
            (target / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
            (target / config.name / "1").symlink_to(source / "1")
    return target


def batch_delay_us(server: TritonServer, model: str) -> int:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    return int(config.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0))


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric on a /metrics page whose labels include `labels`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.02)


@contextmanager
def queued_behind(client: grpcclient.InferenceServerClient, model: str, workload: Workload,
                  metrics_url: str, count: int) -> Iterator[None]:
    """Holds `model`'s instance with a longer request of the same shape, held by the model's
    hold hook (imagegen_contract.TEST_HOLD) until `count` requests wait in the queue, then
    cancelled: they leave the queue together, as one batch, however fast this machine is."""
    steps = functools.partial(metric, metrics_url, "imagegen_diffusion_steps_total", model=model)
    before = steps()
    done: queue.Queue = queue.Queue()
    # At least two steps: the hold waits at the end of a step that is not the last.
    longer = workload.generation(CLIENTS, steps=max(2, workload.steps))
    held = client.async_infer(model, longer.inputs(upscaler=False),
                              callback=lambda result, error: done.put(error),
                              parameters={imagegen_contract.TEST_HOLD: True})
    wait_until(lambda: steps() > before, "the longer request started")
    yield
    pending = functools.partial(metric, metrics_url, "nv_inference_pending_request_count",
                                model=model)
    wait_until(lambda: pending() >= count or not done.empty(), f"{count} requests were queued")
    if not done.empty():
        raise RuntimeError(f"the held request ended before the batch was queued: {done.get()}")
    held.cancel()
    error = done.get(timeout=600)
    if error is None or error.status() != "StatusCode.CANCELLED":
        raise RuntimeError(f"the held request was not cancelled: {error}")


def batch_sizes(client: grpcclient.InferenceServerClient, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def reproducibility(server: TritonServer, workload: Workload) -> tuple[int, float, dict[int, int]]:
    """Each seed alone (on `_off`) against the same requests sharing a pass (on `_on`): the
    largest pixel difference, the share of pixel values that differ, and the batch sizes Triton
    ran on `_on` meanwhile."""
    off, on = f"{workload.name}_off", f"{workload.name}_on"
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        requests = [workload.generation(i).inputs(upscaler=False) for i in range(CLIENTS)]
        alone = [client.infer(off, r).as_numpy(contract.IMAGE.name) for r in requests]
        before = batch_sizes(client, on)
        answers: queue.Queue = queue.Queue()
        with queued_behind(client, on, workload, server.metrics_url, CLIENTS):
            for index, request in enumerate(requests):
                client.async_infer(on, request, callback=lambda result, error, index=index:
                                   answers.put((index, result, error)))
        together: list[np.ndarray] = [np.empty(0)] * CLIENTS
        for _ in requests:
            index, result, error = answers.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"{on} failed: {error}")
            together[index] = result.as_numpy(contract.IMAGE.name)
        time.sleep(0.5)  # Triton records statistics just after it answers
        after = batch_sizes(client, on)
    ran = {size: n - before.get(size, 0) for size, n in after.items() if n != before.get(size, 0)}
    differences = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(alone, together)]
    largest = int(max(d.max() for d in differences))
    share = float(np.mean([np.count_nonzero(d) / d.size for d in differences]))
    return largest, share, ran


@dataclass(frozen=True)
class Side:
    requests: int
    seconds: float
    latencies: np.ndarray

    @classmethod
    def of(cls, measurements: list[Measurement]) -> Side:
        return cls(*Measurement.pooled(measurements))

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def measure(server: TritonServer, analyzer: PerfAnalyzer, workload: Workload,
            workdir: Path) -> dict[tuple[str, int], list[Measurement]]:
    """(side, clients) -> one measurement per round, off and on taking turns."""
    data = workload.input_data()
    runs: dict[tuple[str, int], list[Measurement]] = {}
    for clients, requests in ((CLIENTS, workload.requests), (1, workload.single_requests)):
        for round_ in range(workload.rounds):
            for side in ("off", "on"):
                model = f"{workload.name}_{side}"
                runs.setdefault((side, clients), []).append(analyzer.run(
                    server, model, data, concurrency=clients, requests=requests,
                    workdir=workdir / f"{model}-{clients}-{round_}",
                ))
    return runs


def cpu() -> str:
    model = next((line.partition(":")[2].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 "unknown CPU")
    return f"{model}, {os.cpu_count()} cores, {' '.join(ceiling.cpu_flags()) or 'no AVX2'}"


def workloads(smoke: bool, only: tuple[str, ...]) -> list[Workload]:
    """The demo and SD-shaped workloads (or those in `only`), built when missing."""
    chosen = []
    if not only or "demo" in only:
        shape = (64, 64, 2, 8, 2, 1) if smoke else (128, 128, 4, 16, 4, 12)
        chosen.append(Workload("demo", DEMO_DIR / "diffusion", *shape))
    if not only or "sd" in only:
        folder = BENCH_DIR / ("sd15-unet-narrow" if smoke else "sd15-unet")
        sd = build_sd_shaped(folder, SD15_UNET_NARROW if smoke else SD15_UNET)
        # 128x128 is a 16x16 latent: SD's full channel widths at a size two cores get through
        # in about a second and a half per step and request (classifier-free guidance doubles it).
        shape = (64, 64, 2, 8, 2, 1) if smoke else (128, 128, 2, 8, 2, 3)
        chosen.append(Workload("sd", sd, *shape))
    return chosen


def compare(server: TritonServer, analyzer: PerfAnalyzer, workload: Workload,
            workdir: Path) -> tuple[dict[str, float], list[tuple[object, ...]]]:
    """One workload, off against on: its figures and its table rows."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for side in ("off", "on"):  # first calls allocate; keep them out
            client.infer(f"{workload.name}_{side}", workload.generation(0).inputs(upscaler=False))
    started, load = time.perf_counter(), os.getloadavg()[0]
    runs = measure(server, analyzer, workload, workdir)
    largest, share, batches = reproducibility(server, workload)
    took = time.perf_counter() - started
    sides = {key: Side.of(measurements) for key, measurements in runs.items()}
    # Round by round, the ratio shows how much the machine's other tenants moved it; their
    # median is the figure, since a minute that starves one side moves the pooled ratio.
    rounds = [on.throughput / off.throughput
              for off, on in zip(runs[("off", CLIENTS)], runs[("on", CLIENTS)])]
    ratio = float(np.median(rounds))
    pooled = sides[("on", CLIENTS)].throughput / sides[("off", CLIENTS)].throughput
    name = workload.name
    print(f"{name}: alone vs in a batch of {CLIENTS} (Triton ran {batches}): "
          f"largest pixel difference {largest}/255, {share:.2%} of values differ")
    print(f"{name}: {workload.rounds} round(s) a side, throughput on/off by round "
          f"{' '.join(f'{r:.2f}' for r in rounds)}: median {ratio:.2f}, pooled {pooled:.2f}; "
          f"{took:.0f} s; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    figures = {
        f"batch_throughput_ratio_{name}": ratio,
        f"batch_single_p50_ratio_{name}":
            sides[("on", 1)].percentile_ms(50) / sides[("off", 1)].percentile_ms(50),
    }
    rows = [(name, f"{workload.width}x{workload.height}", workload.steps, clients, side,
             result.requests, f"{result.throughput:.3f}", result.percentile_ms(50),
             result.percentile_ms(95))
            for (side, clients), result in sides.items()]
    return figures, rows


@quiet_libraries()
def run(smoke: bool, only: tuple[str, ...] = (), shape: tuple[int, int, int] | None = None
        ) -> dict[str, float]:
    """Every figure; with `shape` (width, height, steps), only the reproducibility check there."""
    chosen = workloads(smoke, only)
    if shape is not None:
        chosen = [dataclasses.replace(w, width=shape[0], height=shape[1], steps=shape[2])
                  for w in chosen]
    figures: dict[str, float] = {}
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repo = repository(workdir / "repository", {w.name: w.pipeline for w in chosen})
        # Empty: each generated model reads its own `model` parameter.
        # The hold hook on: reproducibility() queues a batch behind a request it releases.
        server = TritonServer.on_free_ports(repo, workdir / "triton",
                                            env={"IMAGEGEN_DIFFUSION_MODEL": "",
                                                 imagegen_contract.TEST_HOLD_ENV: "1"})
        try:
            analyzer = PerfAnalyzer.for_server(server)
            print(f"CPU: {cpu()}")
            print(f"perf_analyzer {analyzer.binary.parent.parent.name}, gRPC; off: max_batch_size 1; "
                  f"on: max_batch_size 8, max_queue_delay "
                  f"{batch_delay_us(server, f'{chosen[0].name}_on')} us")
            for workload in chosen:
                if shape is not None:
                    largest, share, batches = reproducibility(server, workload)
                    print(f"{workload.name} at {workload.width}x{workload.height}, "
                          f"{workload.steps} steps: alone vs in a batch of {CLIENTS} (Triton ran "
                          f"{batches}): largest pixel difference {largest}/255, {share:.2%} of "
                          f"values differ")
                    continue
                more_figures, more_rows = compare(server, analyzer, workload,
                                                  workdir / workload.name)
                figures.update(more_figures)
                rows += more_rows
        finally:
            server.stop()
    if shape is not None:
        return figures
    print_table(["model", "size", "steps", "clients", "batching", "requests", "req/s",
                 "p50 ms", "p95 ms"], rows)
    for name in (w.name for w in chosen):
        print(f"{name}: throughput at {CLIENTS} clients on/off "
              f"{figures[f'batch_throughput_ratio_{name}']:.2f}x (target >= 1.5 on demo); "
              f"one client p50 on/off {figures[f'batch_single_p50_ratio_{name}']:.2f}x "
              f"(target <= 1.1)")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, narrow SD blocks, 1 round")
    parser.add_argument("--only", nargs="+", choices=["demo", "sd"], default=[],
                        help="measure these pipelines only")
    parser.add_argument("--reproducibility", metavar="WxHxSTEPS",
                        help="only compare images alone and batched, at this size and steps")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.reproducibility.split("x")) if args.reproducibility else None
    if shape is not None and len(shape) != 3:
        parser.error("--reproducibility takes WIDTHxHEIGHTxSTEPS, e.g. 512x1024x15")
    print_summary(run(args.smoke, tuple(args.only), shape))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
