"""The Triton image (deploy/docker/triton.Dockerfile) and its entrypoint. No Docker engine runs
here, so the entrypoint runs as the image lays it out (the Dockerfile's COPY into /opt/imagegen,
reproduced in a folder) with this machine's tritonserver (2.51, nvidia-pytriton) standing in for
the image's, on the command lines compose and Kubernetes give it: every API the gateway does not
use is refused on both protocols, and the HTTP listener, where the drain's key works, is on
loopback only. The release and the Python packages of the image itself are read, not run."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
import yaml

from embedded.process import free_port
from embedded.triton import TritonServer, _pytriton_dist, prepare_backends
from harness import kube
from tests.deploy.test_compose import compose
from tests.embedded.triton_api import (
    REGISTER_BODY,
    REGISTER_PATH,
    closed_grpc_header,
    grpc_refusal,
    http_status,
    raw_grpc_frames,
    raw_http1_register,
    register_over_grpc,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "triton.Dockerfile"
ENTRYPOINT = "triton-entrypoint.sh"
START_TIMEOUT_S = 120  # bounds a start that would hang; a tiny model loads in seconds
# The first NGC release with the fixes of NVIDIA's August 2025 bulletin (docs/security.md).
FIRST_FIXED_NGC = (25, 7)

IDENTITY_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(
            r, "IN").as_numpy())]) for r in requests]
'''
IDENTITY_CONFIG = '''name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


def ngc_release() -> tuple[int, int]:
    found = re.search(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+)\.(\d+)-py3$", DOCKERFILE.read_text(),
                      re.MULTILINE)
    assert found, "the Dockerfile's FROM is not an NGC tritonserver release"
    return int(found.group(1)), int(found.group(2))


def test_the_image_is_a_release_with_the_august_2025_fixes() -> None:
    assert ngc_release() >= FIRST_FIXED_NGC


def test_triton_does_not_run_as_root_in_the_image_or_in_compose() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "no USER: the image runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it; 1000 is the image's triton-server.
    assert uid.isdigit() and int(uid) != 0, users
    services = yaml.safe_load(compose("config").stdout)["services"]
    assert str(services["triton"].get("user", uid)).split(":")[0] not in {"0", "root"}


def test_the_python_packages_go_where_the_backend_stub_finds_them() -> None:
    dockerfile = DOCKERFILE.read_text()
    # Ubuntu 24.04's python3 is externally managed (PEP 668): pip must be told, every time.
    installs = re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", dockerfile)
    assert installs and all("--break-system-packages" in i for i in installs), installs
    # The contract module goes beside them, wherever this python3 keeps them, and the build
    # stops unless python3 imports it.
    assert "sysconfig" in dockerfile and 'python3 -c "import imagegen_contract"' in dockerfile


def image_layout(folder: Path) -> Path:
    """/opt/imagegen as the Dockerfile's COPY lays it out, in `folder`."""
    copies = re.findall(r"^COPY ([^\n]+) /opt/imagegen/$", DOCKERFILE.read_text(), re.MULTILINE)
    assert copies, "the Dockerfile copies nothing into /opt/imagegen/"
    for source in " ".join(copies).split():
        shutil.copy2(ROOT / source, folder / Path(source).name)
    assert (folder / ENTRYPOINT).exists()
    return folder / ENTRYPOINT


def tiny_repository(folder: Path) -> Path:
    (folder / "identity" / "1").mkdir(parents=True)
    (folder / "identity" / "1" / "model.py").write_text(IDENTITY_MODEL)
    (folder / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    return folder


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in the host's (little-endian) order
            found.add(str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1]
                                                         for i in range(0, len(raw), 4)))))
    return found


class Entrypoint:
    """The entrypoint started with `args`, on free ports (given after them: Triton takes the
    last value of a flag), with a `tritonserver` on PATH that runs this machine's binary."""

    def __init__(self, tmp_path: Path, args: list[str]) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        server_dir, _ = _pytriton_dist()
        backends = prepare_backends(tmp_path / "work")
        wrapper = bin_dir / "tritonserver"
        # The image's tritonserver finds its backends in /opt/tritonserver; this one is told.
        wrapper.write_text(f'#!/bin/sh\nexec "{server_dir}/bin/tritonserver" '
                           f'--backend-directory="{backends}" "$@"\n')
        wrapper.chmod(0o755)
        environment = TritonServer(workdir=tmp_path / "work").environment()
        environment.update(
            PATH=f"{bin_dir}{os.pathsep}{environment['PATH']}",
            MODEL_REPOSITORY=str(tiny_repository(tmp_path / "models")),
            TRITON_SERVING_REPOSITORY=str(tmp_path / "serving"),
            TRITON_DRAIN_TIMEOUT_S="5",
            TRITON_EXIT_TIMEOUT_S="5",
        )
        entrypoint = image_layout(_mkdir(tmp_path / "opt-imagegen"))
        self.log = tmp_path / "entrypoint.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["sh", str(entrypoint), *args, f"--http-port={self.http}",
                 f"--grpc-port={self.grpc}", f"--metrics-port={self.metrics}"],
                env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def ready(self) -> bool:
        try:
            return http_status(f"{self.http_url}/v2/health/ready", "GET") == 200
        except OSError:  # not listening yet
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def kubernetes_args(tmp_path: Path) -> list[str]:
    rendered = kube.render(kube.KUBERNETES_DIR, "overlays/gpu", tmp_path)
    [container] = rendered.get("Deployment", "imagegen-triton")["spec"]["template"]["spec"][
        "containers"]
    return list(container.get("args", []))


def compose_args() -> list[str]:
    command = yaml.safe_load(compose("config").stdout)["services"]["triton"].get("command") or []
    return [command] if isinstance(command, str) else list(command)


@pytest.fixture(params=["compose", "kubernetes"])
def shape(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Entrypoint]]:
    args = compose_args() if request.param == "compose" else kubernetes_args(tmp_path)
    started = Entrypoint(tmp_path, args)
    try:
        started.wait_ready()
        yield request.param, started
    finally:
        started.stop()


def test_the_entrypoint_s_triton_refuses_shared_memory_and_keeps_http_to_itself(
    shape: tuple[str, Entrypoint],
) -> None:
    name, entrypoint = shape
    # HTTP, on the container's loopback only: the drain's key is useless to anyone outside.
    assert listening_addresses(entrypoint.http) == {"127.0.0.1"}
    assert listening_addresses(entrypoint.grpc) & {"0.0.0.0", "::"}  # every interface
    assert http_status(entrypoint.http_url + REGISTER_PATH, body=REGISTER_BODY) == 403
    assert raw_http1_register("127.0.0.1", entrypoint.http) == 403
    assert http_status(f"{entrypoint.http_url}/v2/repository/index") == 403  # the drain's key
    # gRPC, which the gateway and Kubernetes' probes reach.
    assert register_over_grpc(entrypoint.grpc_url) == "StatusCode.UNAVAILABLE"
    answer = raw_grpc_frames("127.0.0.1", entrypoint.grpc, [closed_grpc_header()])
    assert answer and "HEADERS" not in answer, answer
    with grpcclient.InferenceServerClient(entrypoint.grpc_url) as client:
        assert grpc_refusal(lambda: client.load_model("identity")) == "StatusCode.UNAVAILABLE"
        assert client.is_server_ready() and client.is_model_ready("identity")
    if name == "kubernetes":  # its probes cannot use the HTTP port any more
        kubernetes_probes_work(entrypoint)


def kubernetes_probes_work(entrypoint: Entrypoint) -> None:
    """Startup and readiness are gRPC probes (grpc.health.v1, which Triton answers SERVING once
    ready); liveness runs the image's python3 against the loopback HTTP port, in the pod."""
    deployment = yaml.safe_load(
        (kube.KUBERNETES_DIR / "base" / "triton" / "deployment.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == 8001, container[probe]
    with grpc.insecure_channel(entrypoint.grpc_url) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=bytes, response_deserializer=bytes)
        assert check(b"", timeout=10) == b"\x08\x01"  # HealthCheckResponse{status: SERVING}
    command = container["livenessProbe"]["exec"]["command"]
    assert any(":8000/v2/health/live" in part for part in command), command
    live = subprocess.run(
        [sys.executable if part == "python3" else part.replace(":8000/", f":{entrypoint.http}/")
         for part in command],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert live.returncode == 0, live.stdout + live.stderr
