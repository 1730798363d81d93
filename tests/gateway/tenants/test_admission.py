"""The quotas at the door of one app, on a real Redis: which requests count, the RateLimit
fields on every answer of a limited tenant, the 429s' codes, the lease given back however the
request ends, the metrics, and what happens when Redis is stopped (open: admitted and counted as
unchecked, one warning; closed: 503) or was never configured (the gateway refuses to start); a tenant's /generate at its Triton
priority. Across real gateways: test_two_gateways.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from embedded.redis import RedisServer
from gateway import Settings
from gateway.settings import SettingsError
from gateway.tenants.concurrency import Concurrency
from gateway.tenants.quotas import POLICY
from gateway.tenants.tenant import Tenant
from gateway.triton.contract import Priority
from tests.gateway.tenants.helpers import tenant_entry

RATED_KEY = "rated-" + "r" * 24
PAIR_KEY = "pair-" + "p" * 24
FREE_KEY = "free-" + "f" * 24
INVALID = {"prompt": ""}  # authenticates, then fails validation: 400


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def write_tenants(path: Path) -> str:
    path.write_text(
        tenant_entry("rated", RATED_KEY, requests_per_minute=3)
        + tenant_entry("pair", PAIR_KEY, max_concurrent=2)
        + tenant_entry("free", FREE_KEY),
        "utf-8",
    )
    return str(path)


def value(client: FlaskClient, name: str, **labels: str) -> float | None:
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


@pytest.fixture
def settings(base_settings: Settings, redis_url: str, tmp_path: Path) -> Settings:
    return base_settings.replace(
        tenants_file=write_tenants(tmp_path / "tenants.toml"), redis_url=redis_url,
        retry_after_s=7,
    )


@pytest.fixture
def client(make_app: Callable[[Settings], Flask], settings: Settings) -> FlaskClient:
    return make_app(settings).test_client()


def test_every_authenticated_post_counts_and_carries_the_fields(client: FlaskClient) -> None:
    answers = [
        client.post("/generate", json=INVALID, headers=bearer(RATED_KEY)),
        client.post("/jobs", json=INVALID, headers=bearer(RATED_KEY)),
        client.post("/generate", data=b"{not json", headers=bearer(RATED_KEY)),
        client.post("/jobs", json=INVALID, headers=bearer(RATED_KEY)),
    ]
    # A bad body is the client's request all the same: counted, then refused for what it is.
    assert [a.status_code for a in answers] == [400, 400, 415, 429]
    for answer, remaining in zip(answers, [2, 1, 0, 0], strict=True):
        assert answer.headers["RateLimit-Policy"] == f'"{POLICY}";q=3;w=60'
        prefix = f'"{POLICY}";r={remaining};t='
        assert answer.headers["RateLimit"].startswith(prefix)
        assert 1 <= int(answer.headers["RateLimit"].removeprefix(prefix)) <= 60
    refused = answers[-1]
    assert refused.json["error"]["code"] == "rate_limited"
    assert "3 requests a minute" in refused.json["error"]["message"]
    assert RATED_KEY not in refused.get_data(as_text=True)
    assert refused.headers["Retry-After"] == refused.headers["RateLimit"].rsplit("t=", 1)[1]
    # Reading a job, or any other endpoint, is not counted and says nothing of the rate.
    other = client.get("/jobs/nope", headers=bearer(RATED_KEY))
    assert other.status_code == 404 and "RateLimit" not in other.headers
    assert value(client, "gateway_tenant_requests_total", tenant="rated", outcome="admitted") == 3
    assert value(client, "gateway_tenant_requests_total", tenant="rated", outcome="rate_limited") == 1


def test_a_tenant_without_a_rate_gets_no_fields_and_other_tenants_are_not_counted(
    client: FlaskClient,
) -> None:
    for _ in range(5):
        answer = client.post("/generate", json=INVALID, headers=bearer(FREE_KEY))
        assert answer.status_code == 400
        assert "RateLimit" not in answer.headers and "RateLimit-Policy" not in answer.headers
    assert client.post("/jobs", json=INVALID, headers=bearer(RATED_KEY)).headers["RateLimit"] \
        .startswith(f'"{POLICY}";r=2;')
    assert value(client, "gateway_tenant_requests_total", tenant="free", outcome="admitted") == 5
    # Every tenant of the file has its series from the start.
    assert value(client, "gateway_tenant_requests_total", tenant="pair", outcome="admitted") == 0
    assert value(client, "gateway_tenant_in_flight", tenant="pair") == 0


def test_a_generation_holds_a_lease_until_its_answer(
    client: FlaskClient, settings: Settings
) -> None:
    import redis

    leases = Concurrency(redis.Redis.from_url(str(settings.redis_url)))
    pair = Tenant("pair", max_concurrent=2)
    # Two generations of this tenant in flight elsewhere (another gateway, a job worker).
    held = [leases.acquire(pair, 60), leases.acquire(pair, 60)]
    refused = client.post("/generate", json=INVALID, headers=bearer(PAIR_KEY))
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "concurrency_limited"
    assert "2 generations in flight" in refused.json["error"]["message"]
    assert refused.headers["Retry-After"] == "7"
    assert "RateLimit" not in refused.headers  # no rate limit: no rate fields
    # Jobs take their lease in the worker: creating one is not refused for generations.
    assert client.post("/jobs", json=INVALID, headers=bearer(PAIR_KEY)).status_code == 400
    leases.release(held[0])  # type: ignore[arg-type]
    # Admitted, then refused by validation: the lease went back with the answer.
    assert client.post("/generate", json=INVALID, headers=bearer(PAIR_KEY)).status_code == 400
    assert leases.count("pair") == 1
    assert value(client, "gateway_tenant_requests_total", tenant="pair",
                 outcome="concurrency_limited") == 1
    assert value(client, "gateway_tenant_in_flight", tenant="pair") == 0
    # Only successful generations are timed.
    assert value(client, "gateway_tenant_generation_seconds_count", tenant="pair") == 0


# -- Redis away ---------------------------------------------------------------------------------


@pytest.fixture
def stopped_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, already stopped: every connection is refused."""
    server = RedisServer.on_free_port(tmp_path / "redis")
    server.launch()
    server.stop()
    yield server


def test_fail_open_admits_counts_unchecked_and_warns_once(
    make_app: Callable[[Settings], Flask],
    settings: Settings,
    stopped_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_app(settings.replace(redis_url=stopped_redis.url)).test_client()
    caplog.set_level(logging.WARNING, logger="gateway")
    for key in (RATED_KEY, RATED_KEY, PAIR_KEY, RATED_KEY, RATED_KEY):
        answer = client.post("/generate", json=INVALID, headers=bearer(key))
        # Past the quotas, to validation; no fields, since nothing was counted.
        assert answer.status_code == 400, answer.json
        assert "RateLimit" not in answer.headers
    assert value(client, "gateway_quota_unchecked_total") == 5
    assert value(client, "gateway_tenant_requests_total", tenant="rated", outcome="admitted") == 4
    warnings = [r for r in caplog.records if "quota store unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert stopped_redis.url not in caplog.text
    # A tenant without quotas never needs Redis.
    assert client.post("/generate", json=INVALID, headers=bearer(FREE_KEY)).status_code == 400
    assert value(client, "gateway_quota_unchecked_total") == 5


def test_fail_closed_answers_503_with_retry_after(
    make_app: Callable[[Settings], Flask], settings: Settings, stopped_redis: RedisServer
) -> None:
    client = make_app(
        settings.replace(redis_url=stopped_redis.url, quota_fail_open=False)
    ).test_client()
    answer = client.post("/generate", json=INVALID, headers=bearer(RATED_KEY))
    assert answer.status_code == 503
    assert answer.json["error"]["code"] == "unavailable"
    assert "quota" in answer.json["error"]["message"]
    assert answer.headers["Retry-After"] == "7"
    assert client.post("/jobs", json=INVALID, headers=bearer(PAIR_KEY)).status_code == 400
    assert client.post("/generate", json=INVALID, headers=bearer(FREE_KEY)).status_code == 400
    assert value(client, "gateway_quota_unchecked_total") == 0


def test_quotas_without_redis_refuse_to_start(
    make_app: Callable[[Settings], Flask], settings: Settings
) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_REDIS_URL") as raised:
        make_app(settings.replace(redis_url=None))
    assert "'rated'" in str(raised.value)
    with pytest.raises(SettingsError, match="GATEWAY_REDIS_URL"):
        make_app(settings.replace(redis_url=None, tenants_file=None, api_keys=(FREE_KEY,),
                                  default_max_concurrent=1))
    # Without quotas, no Redis is needed.
    make_app(settings.replace(redis_url=None, tenants_file=None, api_keys=(FREE_KEY,)))


def test_a_tenants_generations_go_to_triton_at_its_priority(
    make_app: Callable[[Settings], Flask],
    triton_settings: Settings,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(tenant_entry("night", RATED_KEY, priority="batch"), "utf-8")
    app = make_app(triton_settings.replace(
        tenants_file=str(path), api_keys=(FREE_KEY,), redis_url=redis_url
    ))
    triton = app.extensions["gateway"].triton
    seen: list[Priority | None] = []
    real = triton.generate

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("priority"))  # type: ignore[arg-type]
        return real(*args, **kwargs)

    monkeypatch.setattr(triton, "generate", spy)
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1,
            "upscale": False, "enable_nsfw_check": False, "response_format": "b64_json"}
    client = app.test_client()
    for key in (RATED_KEY, FREE_KEY):
        answer = client.post("/generate", json=body, headers=bearer(key))
        assert answer.status_code == 200, answer.json
    assert seen == [Priority.BATCH, Priority.INTERACTIVE]
