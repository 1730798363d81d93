"""The front door (embedded/front_door.py, deploy/nginx) in the local stack as `make serve` starts
it: nginx with the shipped settings in front of gunicorn, the session's Triton behind.

Slow clients are held by nginx and closed within its timeouts while probes and generations go
on; bodies and headers over the caps are refused in JSON before gunicorn sees them; one address
gets a bounded number of requests at once; probes and scrapes have a port of their own, which
never waits behind generations; the logged client address cannot be spoofed."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from embedded.front_door import (
    TEMPLATE,
    FrontDoor,
    FrontDoorError,
    FrontDoorSettings,
    render,
    template_variables,
)
from embedded.stack import LocalStack
from embedded.triton import TritonServer
from gateway.settings import Settings
from harness.slow_clients import SlowClients, probe, raise_open_files, sources
from tests.gateway.faults import FaultServer, held
from tests.models.helpers import wait_until

SMALL = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False,
         "enable_nsfw_check": False, "response_format": "b64_json"}
HOLD_S = 60.0  # how long the slow clients are held
# How far from its timeout a slow connection may be seen closed: this process's event loop,
# busy with 1,200 connections on a machine running a generation, notes a connect and a close
# late (a late connect makes the connection look shorter), and nginx's timer may fire late.
CLOSE_SLACK_S = 3.0


@pytest.fixture(scope="module")
def storage() -> Iterator[FaultServer]:
    """Where uploads go: answers held until a test releases them."""
    server = FaultServer(script=[held(200)]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    triton: TritonServer, storage: FaultServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """`make serve`'s stack with the shipped settings, the session's Triton behind it; uploads
    may go to `storage` only."""
    run_dir = tmp_path_factory.mktemp("front-door-stack")
    with LocalStack(
        run_dir, triton=triton, environ=_clean_environ(),
        gateway_settings={"UPLOAD_ALLOWED_HOSTS": f"http://{storage.hostport}"},
    ) as local:
        yield local


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FRONT_"))}


@pytest.fixture(scope="module")
def front(stack: LocalStack) -> FrontDoorSettings:
    return stack.front_door.settings


def send(
    url: str, method: str, path: str, *, body: bytes | None = None,
    headers: dict[str, str] | None = None, source: str = "127.0.0.1", chunked: bool = False,
) -> tuple[int, dict[str, str], Any]:
    """One request from `source`; (status, headers, JSON body or text)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60, source_address=(source, 0))
    try:
        if chunked:
            conn.request(method, path, body=iter([body or b""]), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        got = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    try:
        return response.status, got, json.loads(raw)
    except ValueError:
        return response.status, got, raw.decode(errors="replace")


def declared_only(url: str, path: str, length: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection that sent a header declaring a body of `length` bytes and none of it."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30, source_address=(source, 0))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def answer_of(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    raw = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw)


def access_lines(stack: LocalStack, request_id: str) -> list[dict[str, Any]]:
    assert stack.gateway.log_path is not None
    lines = [json.loads(line) for line in stack.gateway.log_path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("request_id") == request_id and line["message"] == "request"]


def test_slow_clients_are_held_by_nginx_and_closed_within_its_timeouts(
    stack: LocalStack, front: FrontDoorSettings
) -> None:
    raise_open_files(4096)
    slow = SlowClients(
        stack.url, headers=1000, bodies=200,
        header_sources=sources(100, third_octet=201), body_sources=sources(100, third_octet=202),
        interval_s=1.0, body_bytes=100_000,
    )
    healthz: list[tuple[str, float | None]] = []
    generated: list[int] = []
    holding = threading.Event()

    def ask_probes() -> None:
        while holding.is_set():
            for url in (f"{stack.probe_url}/healthz", f"{stack.url}/healthz"):
                healthz.append((url, probe(url, timeout_s=1.0)))
            time.sleep(0.5)

    def generate() -> None:
        while holding.is_set():
            generated.append(send(stack.url, "POST", "/generate", body=json.dumps(SMALL).encode(),
                                  headers={"Content-Type": "application/json"})[0])
            time.sleep(2.0)

    slow.start()
    try:
        holding.set()
        with ThreadPoolExecutor(2) as pool:
            watchers = [pool.submit(ask_probes), pool.submit(generate)]
            time.sleep(HOLD_S)
            holding.clear()
            for watcher in watchers:
                watcher.result(timeout=300)
        held_at_once = dict(slow.peak)
    finally:
        connections = slow.stop(timeout_s=max(front.header_timeout_s, front.body_timeout_s) + 30)

    assert held_at_once == {"header": 1000, "body": 200}, "the slow clients were not all held"
    late = [(url, s) for url, s in healthz if s is None]
    assert healthz and not late, f"/healthz not answered within 1 s {len(late)} of {len(healthz)} times"
    assert len(generated) >= 3 and set(generated) == {200}, generated

    assert all(c.closed is not None and c.by_server for c in connections), "a slow connection stayed open"
    # Nobody answered them: nginx closes a connection that ran out of time without a word.
    assert {c.answer for c in connections} == {b""}
    headers = [c for c in connections if c.kind == "header"]
    bodies = [c for c in connections if c.kind == "body"]
    # The header timeout counts from connecting, however steadily the header trickles.
    held = [c.held_s for c in headers if c.held_s is not None]
    assert abs(min(held) - front.header_timeout_s) <= CLOSE_SLACK_S, min(held)
    assert abs(max(held) - front.header_timeout_s) <= CLOSE_SLACK_S, max(held)
    # The body timeout counts from the last byte: bodies trickling faster stay until they stop.
    quiet = [c.quiet_s for c in bodies if c.quiet_s is not None]
    assert abs(min(quiet) - front.body_timeout_s) <= CLOSE_SLACK_S, min(quiet)
    assert abs(max(quiet) - front.body_timeout_s) <= CLOSE_SLACK_S, max(quiet)
    assert min(c.held_s or 0 for c in bodies) >= HOLD_S, "a body trickler was closed while it trickled"
    print(f"{len(headers)} header and {len(bodies)} body connections; /healthz asked "
          f"{len(healthz)} times, slowest {max(s for _, s in healthz if s) * 1000:.0f} ms; "
          f"{len(generated)} generations; header connections closed after {min(held):.1f}-"
          f"{max(held):.1f} s, bodies {min(quiet):.1f}-{max(quiet):.1f} s after their last byte")


def test_a_body_over_its_endpoints_cap_is_413_before_it_is_read(
    stack: LocalStack, front: FrontDoorSettings
) -> None:
    # Only the header is sent: the answer comes without waiting for the declared body.
    sock = declared_only(stack.url, "/generate", front.generate_max_body_bytes + 1)
    with sock:
        status, headers, body = answer_of(sock)
    assert status == 413 and headers["content-type"] == "application/json"
    assert body == {"error": {"code": "payload_too_large", "message": (
        f"the request body is larger than {front.generate_max_body_bytes} bytes")}}

    # /moderate takes images: its cap is the base64 of the largest one, and its own.
    sock = declared_only(stack.url, "/moderate", front.moderate_max_body_bytes + 1)
    with sock:
        status, _, body = answer_of(sock)
    assert status == 413 and str(front.moderate_max_body_bytes) in body["error"]["message"]
    between = b"{" + b" " * front.generate_max_body_bytes + b"}"
    status, _, body = send(stack.url, "POST", "/moderate", body=between,
                           headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["field"] == "image", body  # the gateway's own answer

    # A chunked body declares nothing: refused once it passes the cap.
    status, _, body = send(stack.url, "POST", "/generate", body=between, chunked=True,
                           headers={"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "payload_too_large"


def test_over_long_headers_are_431_and_over_long_lines_414(
    stack: LocalStack, front: FrontDoorSettings
) -> None:
    long_field = {"X-Long": "a" * front.max_header_bytes}
    status, headers, body = send(stack.url, "GET", "/healthz", headers=long_field)
    assert status == 431 and headers["content-type"] == "application/json"
    assert body["error"]["code"] == "headers_too_large"
    assert str(front.max_header_bytes) in body["error"]["message"]

    # Each field fits, the whole header does not: four buffers of the cap at most.
    many = {f"X-Part-{i}": "b" * (front.max_header_bytes // 2) for i in range(10)}
    assert send(stack.url, "GET", "/healthz", headers=many)[0] == 431

    status, _, body = send(stack.url, "GET", "/healthz?" + "c" * front.max_header_bytes)
    assert status == 414 and body["error"]["code"] == "uri_too_long"

    # What nginx passes, gunicorn takes: 500 small fields are past gunicorn's default of 100.
    small = {f"X-Small-{i}": "d" for i in range(500)}
    status, _, body = send(stack.url, "GET", "/openapi.json", headers=small)
    assert status == 200 and body["openapi"], body
    # The probes' listener gets none of a client's headers: however many, /healthz answers.
    assert send(stack.url, "GET", "/healthz", headers=small)[:3:2] == (200, {"status": "ok"})


def test_one_address_gets_a_bounded_number_of_requests_at_once(
    stack: LocalStack, front: FrontDoorSettings
) -> None:
    crowd, other = "127.0.203.1", "127.0.203.2"
    # Requests that have sent their header count; their bodies never come.
    held = [declared_only(stack.url, "/moderate", 1000, source=crowd)
            for _ in range(front.connections_per_address)]
    try:
        wait_until(lambda: send(stack.url, "GET", "/healthz", source=crowd)[0] == 429,
                   "the address's cap is reached", timeout_s=30)
        status, headers, body = send(stack.url, "GET", "/healthz", source=crowd)
        assert status == 429 and headers["retry-after"] == str(front.retry_after_s)
        assert body["error"]["code"] == "too_many_connections"
        assert str(front.connections_per_address) in body["error"]["message"]
        assert send(stack.url, "GET", "/healthz", source=other)[0] == 200  # another address
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: send(stack.url, "GET", "/healthz", source=crowd)[0] == 200,
               "the address's requests are counted down", timeout_s=30)


def test_probes_and_scrapes_have_a_port_of_their_own(stack: LocalStack) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert send(stack.probe_url, "GET", path)[0] == 200, path
    status, _, body = send(stack.probe_url, "POST", "/generate", body=json.dumps(SMALL).encode())
    assert status == 404 and body["error"]["code"] == "not_found"
    assert send(stack.probe_url, "GET", "/openapi.json")[0] == 404

    for path in ("/metrics", "/readyz"):
        status, headers, body = send(stack.url, "GET", path)
        assert status == 404 and headers["content-type"] == "application/json", path
        assert str(stack.front_door.settings.probe_port) in body["error"]["message"]
    assert send(stack.url, "GET", "/healthz")[0] == 200
    assert send(stack.url, "GET", "/openapi.json")[0] == 200


def test_probes_never_wait_behind_admitted_work(stack: LocalStack, storage: FaultServer) -> None:
    settings = Settings.from_env(stack.gateway.env)
    json_type = {"Content-Type": "application/json"}
    uploading = json.dumps({**SMALL, "response_format": "s3",
                            "s3_prefix": f"{storage.url}/bucket/1.png"}).encode()

    with ThreadPoolExecutor(settings.max_in_flight) as pool:
        # Every slot of the gateway at work, each request holding a gunicorn thread while its
        # upload waits for the storage's answer.
        busy = [pool.submit(send, stack.url, "POST", "/generate", body=uploading, headers=json_type)
                for _ in range(settings.max_in_flight)]
        try:
            wait_until(lambda: storage.unanswered == settings.max_in_flight, "every slot uploads")
            for path in ("/healthz", "/readyz", "/metrics"):
                assert probe(f"{stack.probe_url}{path}", timeout_s=1.0) is not None, path
            refused = send(stack.url, "POST", "/generate", body=uploading, headers=json_type)
            assert refused[0] == 429 and refused[2]["error"]["code"] == "overloaded"
            assert not any(f.done() for f in busy)
        finally:
            storage.release()
        assert [f.result(timeout=120)[0] for f in busy] == [200] * settings.max_in_flight


def test_the_logged_client_address_is_the_one_nginx_saw(stack: LocalStack) -> None:
    client = "127.0.204.9"
    spoofed = {"X-Forwarded-For": "203.0.113.66"}
    request_id = uuid.uuid4().hex
    status, _, _ = send(stack.url, "GET", "/openapi.json", source=client,
                        headers={**spoofed, "X-Request-ID": request_id})
    assert status == 200
    wait_until(lambda: access_lines(stack, request_id), "the gateway's access line", timeout_s=30)
    [line] = access_lines(stack, request_id)
    assert line["remote"] == client  # not the spoofed header, not nginx's loopback

    # Straight to gunicorn from an address it does not trust: the header is ignored there too.
    request_id = uuid.uuid4().hex
    status, _, _ = send(stack.gateway.url, "GET", "/openapi.json", source=client,
                        headers={**spoofed, "X-Request-ID": request_id})
    assert status == 200
    wait_until(lambda: access_lines(stack, request_id), "the gateway's access line", timeout_s=30)
    assert [line["remote"] for line in access_lines(stack, request_id)] == [client]


def test_the_template_uses_every_setting_and_only_them(tmp_path: Path) -> None:
    defaults = FrontDoorSettings.from_env({}, Settings())
    assert template_variables(TEMPLATE.read_text()) == set(defaults.variables())
    FrontDoor(defaults, tmp_path).check_config()  # a real nginx takes what they render
    with pytest.raises(FrontDoorError, match="FRONT_PORT"):
        render("listen ${FRONT_PORT}; root $document_root;", {})
    assert render("listen $FRONT_PORT; root $document_root;", {"FRONT_PORT": "80"}) == (
        "listen 80; root $document_root;"  # nginx's own variables stay
    )


def test_the_gateways_values_are_not_the_front_doors_to_change() -> None:
    gateway = Settings(max_body_bytes=4096, retry_after_s=7)
    front = FrontDoorSettings.from_env({}, gateway)
    assert (front.generate_max_body_bytes, front.retry_after_s) == (4096, 7)
    assert front.moderate_max_body_bytes > gateway.moderate_max_bytes  # base64 and the JSON
    assert front.upstream_timeout_s > gateway.longest_request_s
    with pytest.raises(FrontDoorError, match="FRONT_GENERATE_MAX_BODY_BYTES=65536.*4096"):
        FrontDoorSettings.from_env({"FRONT_GENERATE_MAX_BODY_BYTES": "65536"}, gateway)
    with pytest.raises(FrontDoorError, match="at least"):
        FrontDoorSettings.from_env({"FRONT_UPSTREAM_TIMEOUT_S": "60"}, gateway)
    longer = FrontDoorSettings.from_env({"FRONT_UPSTREAM_TIMEOUT_S": "900"}, gateway)
    assert longer.upstream_timeout_s == 900
    with pytest.raises(FrontDoorError, match="FRONT_HEADER_TIMEOUTS"):
        FrontDoorSettings.from_env({"FRONT_HEADER_TIMEOUTS": "5"}, gateway)
    with pytest.raises(FrontDoorError, match="FRONT_MAX_HEADER_BYTES must be in 1024..8000"):
        FrontDoorSettings.from_env({"FRONT_MAX_HEADER_BYTES": "16384"}, gateway)


def test_the_front_doors_answers_are_the_gateways_error_shape_and_vocabulary() -> None:
    from gateway.errors import ErrorDetail

    documented = dataclasses.fields(ErrorDetail)[0].metadata["description"]
    answers = re.findall(r"return (\d{3}) '(\{.*\})';", TEMPLATE.read_text())
    assert {status for status, _ in answers} >= {"400", "404", "405", "413", "414", "429", "431",
                                                  "503", "504"}
    for status, body in answers:
        # nginx fills in its $variables and the FRONT_* values; the shape is fixed.
        error = json.loads(re.sub(r"\$\{?[A-Za-z_]+\}?", "0", body))["error"]
        assert set(error) == {"code", "message"}, status
        assert error["code"] in documented, (status, error["code"])
