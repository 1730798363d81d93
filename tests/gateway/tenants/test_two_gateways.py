"""A tenant's quotas across two real gateways (gunicorn, two workers each) sharing one real
Redis, in front of the session's Triton: the request rate and the generations in flight are
each one count, whichever gateway and worker a request reaches.

- requests_per_minute = 6: ten requests alternating over both gateways (a generation, then jobs,
  which count together) get exactly six through; the four 429s and every answer before them
  carry RateLimit-Policy, RateLimit and (429) Retry-After with the right numbers, and another
  tenant's count is untouched.
- max_concurrent = 2: with the model held, four concurrent generations of one tenant over both
  gateways leave exactly two waiting at the model and two answered 429 concurrency_limited; once
  released, both finish.
- no key, plain or hashed, in either gateway's output or metrics; the tenant's name in the
  access lines.

Nothing waits on the machine's speed: the rate's numbers are checked against bounds read from
the test's own clock around each request, and the concurrency test holds the model.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from embedded.redis import RedisServer
from embedded.s3 import LocalS3
from embedded.triton import TritonServer
from gateway.tenants.concurrency import Concurrency
from gateway.tenants.quotas import POLICY, WINDOW_S
from gateway.tenants.tenant import key_sha256
from tests.gateway.jobs.helpers import SHAPE, WAIT_S
from tests.gateway.process import GunicornGateway, request
from tests.gateway.tenants.helpers import tenant_entry
from tests.models.helpers import diffusion_held, diffusion_pending, metric, wait_until

LIMITED_KEY = "limited-" + uuid.uuid4().hex
NEIGHBOUR_KEY = "neighbour-" + uuid.uuid4().hex
PAIR_KEY = "pair-" + uuid.uuid4().hex
KEYS = (LIMITED_KEY, NEIGHBOUR_KEY, PAIR_KEY)
PLAIN = {**SHAPE, "response_format": "b64_json"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Pair:
    gateways: tuple[GunicornGateway, GunicornGateway]
    redis_url: str
    s3: LocalS3

    def job(self, name: str) -> dict[str, Any]:
        return {**SHAPE, "response_format": "s3", "s3_prefix": self.s3.presign_put(name)}


@pytest.fixture(scope="module")
def pair(
    triton: TritonServer, s3: LocalS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    run_dir = tmp_path_factory.mktemp("two-gateways")
    store = RedisServer.on_free_port(run_dir / "redis")
    store.launch()
    tenants = run_dir / "tenants.toml"
    tenants.write_text(
        tenant_entry("limited", LIMITED_KEY, requests_per_minute=6)
        + tenant_entry("neighbour", NEIGHBOUR_KEY, requests_per_minute=100)
        + tenant_entry("pair", PAIR_KEY, max_concurrent=2),
        "utf-8",
    )
    settings = {
        "TRITON_URL": triton.grpc_url,
        "TRITON_METRICS_URL": triton.metrics_url,
        # The held generations wait in the model's queue as long as the test holds it.
        "TRITON_QUEUE_TIMEOUT_S": "300",
        "UPLOAD_ALLOWED_HOSTS": f"http://{s3.hostport}",
        "TENANTS_FILE": str(tenants),
        "REDIS_URL": store.url,
        "WORKERS": "2",
    }
    gateways = (
        GunicornGateway(run_dir / "gateway-a.log", **settings),
        GunicornGateway(run_dir / "gateway-b.log", **settings),
    )
    try:
        for gateway in gateways:
            gateway.start()
        for gateway in gateways:
            gateway.wait_ready(timeout=WAIT_S)
        yield Pair(gateways, store.url, s3)
    finally:
        for gateway in gateways:
            gateway.stop()
        store.stop()


def fields(headers: dict[str, str]) -> tuple[str | None, str | None]:
    return headers.get("RateLimit-Policy"), headers.get("RateLimit")


def test_a_rate_of_six_holds_across_both_gateways(pair: Pair) -> None:
    answers: list[tuple[int, dict[str, str], Any]] = []
    sent: list[float] = []
    received: list[float] = []
    for i in range(10):
        gateway = pair.gateways[i % 2]
        sent.append(time.time())
        if i == 0:  # a synchronous generation and jobs share the one rate
            answers.append(request("POST", f"{gateway.url}/generate", PLAIN, bearer(LIMITED_KEY)))
        else:
            answers.append(request("POST", f"{gateway.url}/jobs", pair.job(f"rate/{i}.jpg"),
                                   bearer(LIMITED_KEY)))
        received.append(time.time())

    assert [status for status, _, _ in answers] == [200] + [202] * 5 + [429] * 4, [
        body for _, _, body in answers
    ]
    for i, (status, headers, body) in enumerate(answers):
        policy, limit = fields(headers)
        assert policy == f'"{POLICY}";q=6;w={WINDOW_S}'
        remaining = max(6 - (i + 1), 0)
        prefix = f'"{POLICY}";r={remaining};t='
        assert limit is not None and limit.startswith(prefix), (i, limit)
        t = int(limit.removeprefix(prefix))
        # The window's oldest request (the first) was counted between sent[0] and received[0];
        # this answer's t was read between sent[i] and received[i].
        assert math.ceil(sent[0] + WINDOW_S - received[i]) <= t, (i, t)
        assert t <= math.ceil(received[0] + WINDOW_S - sent[i]), (i, t)
        if status == 429:
            assert body["error"]["code"] == "rate_limited"
            assert "6 requests a minute" in body["error"]["message"]
            assert headers["Retry-After"] == str(t) and t >= 1
        else:
            assert "Retry-After" not in headers

    # Another tenant, on either gateway, has its own count.
    for i, gateway in enumerate(pair.gateways):
        status, headers, _ = request("POST", f"{gateway.url}/jobs", pair.job(f"other/{i}.jpg"),
                                     bearer(NEIGHBOUR_KEY))
        assert status == 202
        policy, limit = fields(headers)
        assert policy == f'"{POLICY}";q=100;w={WINDOW_S}'
        assert limit is not None and limit.startswith(f'"{POLICY}";r={99 - i};t=')

    def total(name: str, **labels: str) -> float:
        return sum(metric(f"{g.url}/metrics", name, **labels) for g in pair.gateways)

    assert total("gateway_tenant_requests_total", tenant="limited", outcome="admitted") == 6
    assert total("gateway_tenant_requests_total", tenant="limited", outcome="rate_limited") == 4
    assert total("gateway_tenant_requests_total", tenant="neighbour", outcome="admitted") == 2


def test_max_concurrent_two_holds_at_the_model_across_both_gateways(
    pair: Pair, triton: TritonServer
) -> None:
    leases = Concurrency(redis.Redis.from_url(pair.redis_url))
    with ThreadPoolExecutor(4) as pool:
        with diffusion_held(triton):
            before = diffusion_pending(triton)
            futures: list[Future[tuple[int, dict[str, str], Any]]] = [
                pool.submit(request, "POST", f"{pair.gateways[i % 2].url}/generate", PLAIN,
                            bearer(PAIR_KEY))
                for i in range(4)
            ]
            wait_until(
                lambda: sum(f.done() for f in futures) == 2
                and diffusion_pending(triton) == before + 2,
                "two generations wait at the model and two are answered",
                timeout_s=WAIT_S,
            )
            refused = [f.result() for f in futures if f.done()]
            for status, headers, body in refused:
                assert status == 429, body
                assert body["error"]["code"] == "concurrency_limited"
                assert "2 generations in flight" in body["error"]["message"]
                assert int(headers["Retry-After"]) >= 1
                assert fields(headers) == (None, None)  # no rate limit: no rate fields
            # Still exactly two at the model, and two leases in Redis: no third got through.
            assert diffusion_pending(triton) == before + 2
            assert leases.count("pair") == 2
            assert sum(f.done() for f in futures) == 2
        finished = [f.result(timeout=WAIT_S) for f in futures]
    statuses = sorted(status for status, _, _ in finished)
    assert statuses == [200, 200, 429, 429]
    wait_until(lambda: leases.count("pair") == 0, "the leases went back with the answers")
    # And the tenant generates again.
    status, _, _ = request("POST", f"{pair.gateways[0].url}/generate", PLAIN, bearer(PAIR_KEY))
    assert status == 200
    assert sum(metric(f"{g.url}/metrics", "gateway_tenant_requests_total", tenant="pair",
                      outcome="concurrency_limited") for g in pair.gateways) == 2


def test_no_key_plain_or_hashed_in_logs_or_metrics_and_the_tenant_in_access_lines(
    pair: Pair,
) -> None:
    secrets = [*KEYS, *(key_sha256(k) for k in KEYS)]
    for gateway in pair.gateways:
        with_metrics = gateway.output() + request("GET", f"{gateway.url}/metrics")[2]
        for secret in secrets:
            assert secret not in with_metrics
        accesses = [line for line in gateway.log_lines() if line["logger"] == "gunicorn.access"]
        tenants = {(a.get("tenant"), a["path"]) for a in accesses}
        assert ("limited", "/jobs") in tenants
        assert ("pair", "/generate") in tenants
        # Probes carry no key, hence no tenant.
        assert all(a.get("tenant") is None for a in accesses if a["path"] == "/healthz")
