"""Fixtures for the gateway tests: real servers only (moto S3 with embedded/s3.py's bucket, a
scripted fault server, and the session's Triton from tests/conftest.py), apps built from explicit
`Settings` values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from embedded.process import free_port
from embedded.s3 import LocalS3, MotoS3Server
from gateway import Settings, create_app
from tests.gateway.fake_nvidia import faces
from tests.gateway.faults import FaultServer


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    log_path = Path(tmp_path_factory.mktemp("s3")) / "moto.log"
    with MotoS3Server(port=free_port(), log_path=log_path) as server:
        yield LocalS3(server).create()


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer().start()
    yield server
    server.stop()


@pytest.fixture
def nvidia_api() -> Iterator[FaultServer]:
    """The local stand-in for NVIDIA's deepfake API (tests/gateway/fake_nvidia.py): one face."""
    server = FaultServer(script=[faces(0.87)]).start()
    yield server
    server.stop()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    return free_port()


@pytest.fixture
def base_settings(fault_server: FaultServer) -> Settings:
    """No Triton behind it (an unused port); fast retries; the fault server allowed."""
    return Settings(
        triton_url=f"127.0.0.1:{free_port()}",
        triton_metrics_url=f"http://127.0.0.1:{free_port()}/metrics",
        upload_allowed_hosts=(f"http://{fault_server.hostport}",),
        upload_backoff=(0.05, 0.1, 0.2),
        upload_timeout_s=2.0,
        probe_timeout_s=1.0,
    )


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], Flask]]:
    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        app = create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["gateway"].triton.close()
        if app.extensions["gateway"].deepfake is not None:
            app.extensions["gateway"].deepfake.close()


@pytest.fixture
def client(make_app: Callable[[Settings], Flask], base_settings: Settings) -> FlaskClient:
    return make_app(base_settings).test_client()


@pytest.fixture
def triton_settings(triton: Any, s3: LocalS3, fault_server: FaultServer) -> Settings:
    """The session's Triton, the local S3 and the fault server allowed, fast retries."""
    return Settings(
        triton_url=triton.grpc_url,
        triton_metrics_url=triton.metrics_url,
        upload_allowed_hosts=(f"http://{s3.hostport}", f"http://{fault_server.hostport}"),
        upload_backoff=(0.05, 0.1, 0.2),
        upload_timeout_s=2.0,
        triton_deadline_s=60.0,
    )


@pytest.fixture
def triton_client(make_app: Callable[[Settings], Flask], triton_settings: Settings) -> FlaskClient:
    return make_app(triton_settings).test_client()
