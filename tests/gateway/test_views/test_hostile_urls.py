"""SSRF through `s3_prefix`: hostile URLs are 400s naming the field, and nothing is connected.

Loopback forms are sent to an app with the real Triton behind it and wildcard entries that
would let them through if only names were checked; a trap listens where they point and must see
no connection. Forms of other internal addresses go to an app whose Triton is a dead port, so
even a broken check could never send traffic off this machine (the answer would be a 503).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway import Settings
from tests.gateway.conftest import LocalS3
from tests.gateway.faults import FaultServer, Trap

BODY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False}


@pytest.fixture
def traps() -> Iterator[list[Trap]]:
    """Traps on one port of 127.0.0.1 and ::1."""
    first = Trap("127.0.0.1")
    found = [first]
    try:
        found.append(Trap("::1", first.port))
    except OSError:  # no IPv6 loopback on this machine: the IPv4 trap still counts
        pass
    yield found
    for trap in found:
        trap.stop()


def hostile_loopback_urls(port: int, s3: LocalS3, triton: Any) -> list[str]:
    return [
        f"http://2130706433:{port}/a/1.png",  # 127.0.0.1 in decimal
        f"http://0x7f000001:{port}/a/1.png",  # hex
        f"http://0x7f.0.0.1:{port}/a/1.png",
        f"http://0177.0.0.1:{port}/a/1.png",  # octal
        f"http://127.1:{port}/a/1.png",  # short form
        f"http://017700000001:{port}/a/1.png",
        f"http://[::ffff:127.0.0.1]:{port}/a/1.png",  # IPv4-mapped IPv6
        f"http://[::ffff:7f00:1]:{port}/a/1.png",
        f"http://[::1]:{port}/a/1.png",
        f"http://[0:0:0:0:0:0:0:1]:{port}/a/1.png",
        f"http://0.0.0.0:{port}/a/1.png",  # reaches the local host on Linux
        f"http://[::]:{port}/a/1.png",
        f"http://127.0.0.1:{port}/a/1.png",  # allowed by the wildcard by name, loopback by address
        f"http://127.0.0.1.:{port}/a/1.png",
        f"http://localhost:{port}/a/1.png",
        f"http://LOCALHOST.:{port}/a/1.png",
        f"http://{s3.hostport}@127.0.0.1:{port}/a/1.png",  # allowed@evil userinfo
        f"http://user:pw@{s3.hostport}/a/1.png",
        f"http://127.0.0.1:{port}#@{s3.hostport}/a/1.png",
        f"http://127.0.0.1:{port}\\@{s3.hostport}/a/1.png",
        f"http://{s3.hostport}.127.0.0.1:{port}/a/1.png",
        f"https://127.0.0.1:{port}/a/1.png",  # https to loopback through the wildcard
        f"gopher://127.0.0.1:{port}/a/1.png",
        f"file://127.0.0.1:{port}/a/1.png",
        f"ftp://127.0.0.1:{port}/a/1.png",
        f"HTTP://127.0.0.1:{port}/a/1.png",
        # Triton's own ports: HTTP (model control), gRPC, metrics.
        f"http://127.0.0.1:{triton.http_port}/v2/repository/models/diffusion/unload/1.png",
        f"http://127.0.0.1:{triton.grpc_port}/a/1.png",
        f"http://localhost:{triton.metrics_port}/metrics/1.png",
        # The local S3 by a name or port other than the ones allowed.
        f"http://localhost:{s3.server.port}/aiu-character/1.png",
        f"http://127.0.0.1:{s3.server.port + 1}/aiu-character/1.png",
    ]


def test_hostile_loopback_urls_are_400_and_the_trap_sees_nothing(
    make_app: Any, triton_settings: Settings, traps: list[Trap], s3: LocalS3, triton: Any
) -> None:
    port = traps[0].port
    # Wildcards on the trap's port, over http too: only the address check stands in the way.
    allowed = (*triton_settings.upload_allowed_hosts, f"http://*:{port}", f"*:{port}")
    client: FlaskClient = make_app(triton_settings.replace(upload_allowed_hosts=allowed)).test_client()
    for url in hostile_loopback_urls(port, s3, triton):
        response = client.post("/generate", json={**BODY, "s3_prefix": url})
        assert response.status_code == 400, (url, response.json)
        assert response.json["error"]["field"] == "s3_prefix", url
    assert [trap.connections for trap in traps] == [0] * len(traps)


def test_the_trap_does_see_an_upload_that_is_allowed(
    make_app: Any, triton_settings: Settings, traps: list[Trap]
) -> None:
    """The control: listed exactly, the same trap receives the PUT (and answers nothing)."""
    trap = traps[0]
    settings = triton_settings.replace(
        upload_allowed_hosts=(f"http://127.0.0.1:{trap.port}",), upload_timeout_s=0.5
    )
    response = make_app(settings).test_client().post(
        "/generate", json={**BODY, "s3_prefix": f"http://127.0.0.1:{trap.port}/a/1.png"}
    )
    assert response.status_code == 502 and response.json["error"]["code"] == "upload_failed"
    assert trap.connections == 4  # every attempt


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/1.png",  # cloud metadata
        "http://[fd00:ec2::254]/latest/1.png",  # its IPv6 form (unique local)
        "http://2852039166/latest/1.png",  # 169.254.169.254 in decimal
        "http://0xa9fea9fe/latest/1.png",
        "http://[::ffff:169.254.169.254]/latest/1.png",
        "http://[::ffff:a9fe:a9fe]/latest/1.png",
        "http://10.0.0.1/a/1.png",
        "http://172.16.0.1/a/1.png",
        "http://192.168.0.1/a/1.png",
        "http://100.64.0.1/a/1.png",
        "http://[fe80::1]/a/1.png",
        "http://[fc00::1]/a/1.png",
        "http://[2002:a00:1::]/a/1.png",  # 6to4 around 10.0.0.1
        "http://224.0.0.1/a/1.png",  # multicast
        "http://[ff02::1]/a/1.png",
        "http://255.255.255.255/a/1.png",
        "http://240.0.0.1/a/1.png",
    ],
)
def test_other_internal_addresses_are_400_naming_s3_prefix(
    make_app: Any, base_settings: Settings, fault_server: FaultServer, url: str
) -> None:
    settings = base_settings.replace(upload_allowed_hosts=("*", "http://*"))
    response = make_app(settings).test_client().post("/generate", json={**BODY, "s3_prefix": url})
    assert response.status_code == 400, response.json
    assert response.json["error"]["field"] == "s3_prefix"

