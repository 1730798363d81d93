"""deploy/docker/set_instances.py, the Triton container's instance counts from the environment:
run as the entrypoint runs it, its output parsed as Triton's own ModelConfig, and served by a
real Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedded.triton import DEFAULT_REPOSITORY, TritonServer

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "set_instances.py"


def run(target: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_INSTANCES_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(DEFAULT_REPOSITORY), str(target)],
        env={**environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )


def config(repository: Path, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )


def counts(repository: Path, model: str) -> list[int]:
    return [group.count for group in config(repository, model).instance_group]


def test_counts_come_from_the_environment_and_the_rest_is_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "models"
    done = run(target, TRITON_INSTANCES_DIFFUSION="3", TRITON_INSTANCES_NSFW="2")
    assert done.returncode == 0, done.stderr
    assert "diffusion: 3 instance(s)" in done.stdout and "nsfw: 2 instance(s)" in done.stdout
    assert counts(target, "diffusion") == [3]
    assert counts(target, "nsfw") == [2]
    assert counts(target, "upscaler") == counts(DEFAULT_REPOSITORY, "upscaler") == [1]
    for model in ("diffusion", "nsfw"):  # only the count moved
        rewritten, original = config(target, model), config(DEFAULT_REPOSITORY, model)
        del rewritten.instance_group[:], original.instance_group[:]
        assert rewritten == original
    for model in ("txt2img", "txt2img_nsfw", "upscaler"):
        assert (target / model / "config.pbtxt").read_text() == (
            DEFAULT_REPOSITORY / model / "config.pbtxt"
        ).read_text()
    # Everything else is linked, not copied: exported weights stay where they are.
    assert (target / "diffusion" / "1").is_symlink()
    assert (target / "diffusion" / "1" / "model.py").read_text() == (
        DEFAULT_REPOSITORY / "diffusion" / "1" / "model.py"
    ).read_text()


def test_a_second_run_replaces_the_first(tmp_path: Path) -> None:
    target = tmp_path / "models"
    assert run(target, TRITON_INSTANCES_UPSCALER="4").returncode == 0
    assert run(target).returncode == 0
    assert counts(target, "upscaler") == [1]


def test_bad_variables_stop_the_container_with_a_reason(tmp_path: Path) -> None:
    cases = {
        "TRITON_INSTANCES_DIFUSION": ("2", "no model of that name"),
        "TRITON_INSTANCES_TXT2IMG": ("2", "an ensemble has no instances"),
        "TRITON_INSTANCES_NSFW": ("0", "expected a whole number of instances >= 1"),
        "TRITON_INSTANCES_UPSCALER": ("two", "expected a whole number of instances >= 1"),
    }
    for name, (value, reason) in cases.items():
        done = run(tmp_path / name, **{name: value})
        assert done.returncode == 1, name
        assert name in done.stderr and reason in done.stderr, done.stderr
        assert not (tmp_path / name).exists()  # nothing half-built to serve


def test_triton_serves_the_copy_with_the_counts_set(tmp_path: Path) -> None:
    target = tmp_path / "models"
    assert run(target, TRITON_INSTANCES_UPSCALER="2").returncode == 0
    # The upscaler alone loads in seconds; it is enough to show Triton takes the linked layout.
    server = TritonServer.on_free_ports(
        target, tmp_path / "triton", extra_args=["--model-control-mode=explicit", "--load-model=upscaler"]
    )
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/upscaler/config", timeout=10) as resp:
            served = json.loads(resp.read())
        with urllib.request.urlopen(f"{server.http_url}/v2/models/upscaler/ready", timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.stop()
    assert [group["count"] for group in served["instance_group"]] == [2]
