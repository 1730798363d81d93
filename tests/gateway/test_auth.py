"""API keys: who gets in, which endpoints are open, where keys come from."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from gateway import Settings
from gateway.auth import OPEN_ENDPOINTS
from gateway.settings import SettingsError
from gateway.tenants.tenant import Tenants
from tests.gateway.process import GunicornGateway, request
from tests.models.helpers import wait_until

KEY = "key-one-" + "a" * 16
OTHER = "key-two-" + "b" * 16


@pytest.fixture
def app(make_app: Callable[[Settings], Flask], base_settings: Settings) -> Flask:
    return make_app(base_settings.replace(api_keys=(KEY, OTHER)))


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer  {KEY.upper()}"],
)
def test_generate_without_a_valid_key_is_401_json(app: Flask, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = app.test_client().post("/generate", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("key", [KEY, OTHER])
def test_every_configured_key_gets_in(app: Flask, key: str) -> None:
    for header in (f"Bearer {key}", f"bearer {key}", f"  Bearer {key}  "):
        response = app.test_client().post("/generate", json={"prompt": "x"}, headers={"Authorization": header})
        # Past authentication: the body is checked (s3_prefix is missing).
        assert response.status_code == 400 and response.json["error"]["field"] == "s3_prefix"


def test_probes_metrics_and_the_api_description_are_open(app: Flask) -> None:
    client = app.test_client()
    assert OPEN_ENDPOINTS == {"gateway.healthz", "gateway.readyz", "gateway.metrics", "gateway.openapi",
                              "docs.page", "docs.page_with_slash", "docs.asset"}
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # open, and Triton is a dead port here
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/docs/assets/docs.js").status_code == 200


def test_unknown_paths_and_methods_need_a_key_too(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/admin").status_code == 401
    assert client.get("/generate").status_code == 401
    assert client.get("/admin", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_refusals_are_counted_without_the_key(app: Flask) -> None:
    client = app.test_client()
    client.post("/generate", json={}, headers={"Authorization": "Bearer nope-nope-nope-nope"})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'gateway_http_requests_total{endpoint="/generate",method="POST",status="401"} 1.0' in text
    assert "nope-nope" not in text


def test_keys_from_a_file_add_to_the_list(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2025-09\n{OTHER}\n\n  {KEY}  \n")
    tenants = Tenants.from_settings(
        Settings(api_keys=("c" * 16,), api_keys_file=str(keys_file))
    )
    for key in (KEY, OTHER, "c" * 16):
        assert tenants.identify(f"Bearer {key}") is not None
    assert tenants.identify("Bearer # rotated 2025-09") is None


@pytest.mark.parametrize(("content", "message"), [(None, "No such file"), ("# none\n", "holds no key"), ("short\n", "16")])
def test_a_bad_key_file_stops_the_gateway_naming_the_variable(
    tmp_path: Path, content: str | None, message: str
) -> None:
    keys_file = tmp_path / "keys"
    if content is not None:
        keys_file.write_text(content)
    with pytest.raises(SettingsError, match=message) as err:
        Tenants.from_settings(Settings(api_keys_file=str(keys_file)))
    assert "GATEWAY_API_KEYS_FILE" in str(err.value)


def test_no_keys_means_open_and_a_loud_warning(
    make_app: Callable[[Settings], Flask], base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway"):
        app = make_app(base_settings)
    assert any(r.levelno == logging.WARNING and "NO API KEYS" in r.getMessage() for r in caplog.records)
    assert app.test_client().post("/generate", json={"prompt": "x"}).status_code == 400


def test_with_keys_there_is_no_warning(
    make_app: Callable[[Settings], Flask], base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway"):
        make_app(base_settings.replace(api_keys=(KEY,)))
    assert not any("NO API KEYS" in r.getMessage() for r in caplog.records)


def test_sighup_reloads_the_key_file(tmp_path: Path) -> None:
    """Rotation as the setting documents it: rewrite GATEWAY_API_KEYS_FILE, send gunicorn HUP;
    its new workers build the app again and read the file, the old ones finish and leave."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY}\n")
    body = {"prompt": "x"}  # past authentication, a 400 for the missing s3_prefix

    def status(server: GunicornGateway, key: str) -> int:
        code, _, _ = request("POST", f"{server.url}/generate", body, {"Authorization": f"Bearer {key}"})
        return code

    with GunicornGateway(tmp_path / "gateway.log", API_KEYS_FILE=str(keys_file)) as server:
        assert (status(server, KEY), status(server, OTHER)) == (400, 401)
        before = set(server.worker_pids())
        keys_file.write_text(f"{OTHER}\n")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        # Every worker that answers from here on is one started after the HUP.
        wait_until(lambda: (pids := set(server.worker_pids())) and not pids & before,
                   "new workers replaced the old ones")
        assert (status(server, KEY), status(server, OTHER)) == (401, 400)
