"""A gateway without API keys refuses to start unless GATEWAY_ALLOW_ANONYMOUS=true says that
serving everyone is meant: under gunicorn (the master stops before any worker) and from
create_app() reading the environment (any other WSGI server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedded.process import free_port
from embedded.triton import PROJECT_ROOT
from gateway import create_app
from gateway.settings import Settings, SettingsError
from tests.gateway.process import GunicornGateway

MESSAGE = (
    "no API key: set GATEWAY_API_KEYS, GATEWAY_API_KEYS_FILE or GATEWAY_TENANTS_FILE, or "
    "GATEWAY_ALLOW_ANONYMOUS=true"
)


def _environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_PORT=str(free_port()), GATEWAY_TRITON_URL=f"127.0.0.1:{free_port()}",
               PYTHONPATH=str(PROJECT_ROOT), **{f"GATEWAY_{k}": v for k, v in settings.items()})
    return env


def _gunicorn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", "gateway/gunicorn.conf.py",
         "gateway:create_app()"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_gunicorn_refuses_to_start_keyless_by_default() -> None:
    done = _gunicorn(_environment())  # no keys, and nothing said about anonymous access
    assert done.returncode != 0
    assert MESSAGE in done.stderr, done.stderr


def test_gunicorn_refuses_to_start_keyless_when_anonymous_access_is_refused(tmp_path: Path) -> None:
    gateway = GunicornGateway(tmp_path / "gateway.log", ALLOW_ANONYMOUS="false")
    gateway.start()
    assert gateway.process is not None
    assert gateway.process.wait(timeout=60) != 0
    assert MESSAGE in gateway.output()


def test_the_opt_out_lets_a_keyless_gateway_start(tmp_path: Path) -> None:
    with GunicornGateway(tmp_path / "gateway.log", ALLOW_ANONYMOUS="true") as gateway:
        assert gateway.process is not None and gateway.process.poll() is None


def test_create_app_refuses_a_keyless_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    with pytest.raises(SettingsError, match="GATEWAY_ALLOW_ANONYMOUS=true"):
        create_app()


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({}, True),
        ({"allow_anonymous": False}, True),
        ({"allow_anonymous": True}, False),
        ({"api_keys": ("k" * 32,)}, False),
        ({"api_keys_file": "/run/secrets/api_keys"}, False),
    ],
)
def test_only_keys_or_the_explicit_opt_out_let_it_start(
    settings: dict[str, object], refused: bool
) -> None:
    assert (Settings(**settings).anonymous_problem() is not None) is refused  # type: ignore[arg-type]


def test_the_opt_out_is_read_from_the_environment() -> None:
    assert Settings.from_env({"GATEWAY_ALLOW_ANONYMOUS": "true"}).allow_anonymous
    assert not Settings.from_env({}).allow_anonymous
    with pytest.raises(SettingsError, match="GATEWAY_ALLOW_ANONYMOUS"):
        Settings.from_env({"GATEWAY_ALLOW_ANONYMOUS": "maybe"})
