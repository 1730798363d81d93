"""Session-wide real servers: one Triton on the real model repository with the demo models."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from embedded.redis import RedisServer
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.demo_models import DEMO_DIR, build
from tests.models.helpers import HOLD_ENV, failing_nsfw_repository


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo models of `make models` (built here when a bare `pytest` runs first)."""
    build()
    return DEMO_DIR


@pytest.fixture(scope="session")
def triton(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The real repository, with the diffusion model's test hook on (tests/models/helpers.py,
    HOLD): tests hold the model with requests they release themselves."""
    server = TritonServer.on_free_ports(
        DEFAULT_REPOSITORY, tmp_path_factory.mktemp("triton"), env={HOLD_ENV: "1"}
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def failing_nsfw_triton(
    demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A second Triton whose extra NSFW models fail safe (tests/models/helpers.py,
    `failing_nsfw_repository`): one for every test that needs a timeout or an error."""
    repository = failing_nsfw_repository(tmp_path_factory.mktemp("failsafe-repository"))
    server = TritonServer.on_free_ports(
        repository,
        tmp_path_factory.mktemp("failsafe-triton"),
        env={"IMAGEGEN_DIFFUSION_MODEL": str(demo_models / "diffusion")},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (Debian's) for the session, with the shipped persistence."""
    server = RedisServer.on_free_port(tmp_path_factory.mktemp("redis"))
    server.launch()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (a test that stops or freezes it restarts
    or resumes it before it ends)."""
    import redis

    redis.Redis.from_url(redis_server.url, socket_timeout=5).flushall()
    return redis_server.url
