"""Triton's own load generator, perf_analyzer, in the release of the server it measures.

PyPI's `perf-analyzer` wheels (2.58 and later) are built for glibc 2.38, newer than Debian 12's
2.36, so they do not run here. The same binary ships in the `tritonclient` wheel of each Triton
release up to 2.5x, built for older systems: it is installed on first use, with pip and without
dependencies, into its own folder under models/bench/ (apart from the project's newer
tritonclient, whose requirements would clash), and runs with the libb64 and libcudart that the
nvidia-pytriton wheel already bundles for tritonserver itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.nsfw import BENCH_DIR
from embedded.triton import TritonServer, _pytriton_dist

INSTALL_DIR = BENCH_DIR / "perf_analyzer"
# The sonames perf_analyzer links that the system lacks, found among nvidia-pytriton's libraries
# (which carry a hash in their file names).
BUNDLED = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def server_version(server: TritonServer) -> str:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return str(client.get_server_metadata(as_json=True)["version"])


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    libraries: Path

    @classmethod
    def for_server(cls, server: TritonServer) -> PerfAnalyzer:
        """perf_analyzer of the server's release, installed on first use."""
        version = server_version(server)
        folder = INSTALL_DIR / version
        binary = folder / "bin" / "perf_analyzer"
        if not binary.exists():
            print(f"installing perf_analyzer {version} (tritonclient=={version}) into {folder}",
                  flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                 "--target", str(folder), f"tritonclient=={version}"],
                check=True,
            )
            if not binary.exists():
                raise RuntimeError(f"tritonclient {version} ships no perf_analyzer")
        libraries = folder / "lib"
        libraries.mkdir(exist_ok=True)
        _, bundled = _pytriton_dist()
        for soname, pattern in BUNDLED.items():
            found = sorted(bundled.glob(pattern))
            if not found:
                raise RuntimeError(f"nvidia-pytriton bundles no {pattern} for perf_analyzer")
            link = libraries / soname
            link.unlink(missing_ok=True)
            link.symlink_to(found[0])
        return cls(binary, libraries)

    def run(
        self,
        server: TritonServer,
        model: str,
        data: Mapping[str, object],
        *,
        concurrency: int,
        requests: int,
        workdir: Path,
    ) -> Measurement:
        """`requests` requests from `concurrency` clients over gRPC, each request taking the next
        entry of `data` (perf_analyzer's --input-data JSON); per-request times from its export."""
        workdir.mkdir(parents=True, exist_ok=True)
        data_file = workdir / "input.json"
        data_file.write_text(json.dumps(data))
        export = workdir / "export.json"
        command = [
            str(self.binary), "-m", model, "-i", "grpc", "-u", server.grpc_url,
            "--concurrency-range", str(concurrency), "--request-count", str(requests),
            "--input-data", str(data_file), "--profile-export-file", str(export),
            "--max-trials", "1",
        ]
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.libraries)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return Measurement.from_export(json.loads(export.read_text()))


@dataclass(frozen=True)
class Measurement:
    """Requests timed by perf_analyzer: when each was sent and answered (seconds)."""

    sent: np.ndarray
    answered: np.ndarray

    @classmethod
    def from_export(cls, export: Mapping[str, object]) -> Measurement:
        (experiment,) = export["experiments"]  # type: ignore[misc]
        requests = experiment["requests"]
        sent = np.array([r["timestamp"] for r in requests], dtype=np.int64)
        answered = np.array([r["response_timestamps"][-1] for r in requests], dtype=np.int64)
        return cls(sent / 1e9, answered / 1e9)

    @property
    def latencies(self) -> np.ndarray:
        return self.answered - self.sent

    @property
    def seconds(self) -> float:
        return float(self.answered.max() - self.sent.min())

    @property
    def throughput(self) -> float:
        return len(self.sent) / self.seconds

    @staticmethod
    def pooled(measurements: Sequence[Measurement]) -> tuple[int, float, np.ndarray]:
        """Requests, seconds and latencies of several measurements taken one after another."""
        count = sum(len(m.sent) for m in measurements)
        seconds = sum(m.seconds for m in measurements)
        return count, seconds, np.concatenate([m.latencies for m in measurements])
