"""JSON logs with request ids, and no secret in them: the formatter on its own, then the logs of
full requests through a real gunicorn, searched for the signature and the API key."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from gunicorn.glogging import SafeAtoms

from gateway import Settings
from gateway.logs import JsonFormatter, redact, request_id, truncate
from tests.gateway.conftest import LocalS3
from tests.gateway.faults import FaultServer
from tests.gateway.process import GunicornGateway, request

API_KEY = "k3y-" + "s3cr3t" * 4
SIGNATURE = "yiRa6eTIiuPtE3wGWzFzmS3snA"
ACCESS_KEY = "AKIAQE43KJDN7ARTLAVM"
SPEC_QUERY = f"?AWSAccessKeyId={ACCESS_KEY}&Signature=%2B{SIGNATURE}%3D&Expires=1756921542"


def record(message: str, *args: Any, name: str = "gateway.views", **extra: Any) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": name, "msg": message, "args": args, "levelname": "INFO"})
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_object_with_the_request_id_and_extra_fields() -> None:
    token = request_id.set("abc-123")
    try:
        line = JsonFormatter().format(record("generated %s", "64x64", prompt="a cat"))
    finally:
        request_id.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "generated 64x64"
    assert entry["request_id"] == "abc-123"
    assert entry["prompt"] == "a cat"
    assert entry["level"] == "INFO" and entry["logger"] == "gateway.views"
    assert "\n" not in line


def test_secrets_are_scrubbed_and_the_line_stays_valid_json() -> None:
    message = (
        f'PUT "http://s3.test/b/1.png{SPEC_QUERY}" failed; retry with Signature={SIGNATURE} '
        f"and Authorization: Bearer {API_KEY}"
    )
    line = JsonFormatter().format(record(message))
    entry = json.loads(line)  # a quote right after the query must not break the escaping
    for secret in (SIGNATURE, ACCESS_KEY, API_KEY):
        assert secret not in line
    assert "http://s3.test/b/1.png?[redacted]" in entry["message"]


def test_an_exception_is_logged_redacted() -> None:
    try:
        raise RuntimeError(f"upload to https://s3.test/x.jpg{SPEC_QUERY} failed")
    except RuntimeError:
        rec = record("boom")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "RuntimeError" in json.loads(line)["exception"] and SIGNATURE not in line


def test_the_access_line_takes_named_atoms_only_never_the_headers() -> None:
    atoms = SafeAtoms(
        {
            "m": "POST", "U": "/generate", "s": "200", "B": 120, "M": 35, "h": "127.0.0.1",
            "q": f"api_key={API_KEY}", "{authorization}i": f"Bearer {API_KEY}",
            "{x-request-id}o": "rid-1",
        }
    )
    # As gunicorn logs it: access_log.info(format, atoms), which makes record.args the atoms.
    rec = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(m)s %(U)s", (atoms,), None)
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["message"] == "request"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/generate", 200)
    assert entry["request_id"] == "rid-1" and entry["duration_ms"] == 35
    assert API_KEY not in json.dumps(entry)


def test_redact_and_truncate() -> None:
    assert redact("https://h/a.jpg?X-Amz-Signature=abc&b=1 ok") == "https://h/a.jpg?[redacted] ok"
    assert redact("x-amz-credential=AKIA%2F1&y") == "x-amz-credential=[redacted]&y"
    assert redact("nothing secret here") == "nothing secret here"
    assert truncate("abcdef", 3) == "abc…(+3 chars)" and truncate("abc", 3) == "abc"


def test_request_ids_are_returned_and_kept_when_they_are_plain_tokens(client: FlaskClient) -> None:
    generated = {client.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
    assert len(generated) == 3  # a fresh id per request
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42.a_b:c"}).headers["X-Request-ID"] == "trace-42.a_b:c"
    for bad in ("with space", "x" * 200, "quote\"d", "tab\there", "é"):
        returned = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert returned != bad and len(returned) == 32
    # Errors carry it too.
    assert client.post("/generate", json={}).headers["X-Request-ID"]


def test_the_logs_of_full_requests_hold_no_signature_and_no_key(
    triton_settings: Settings, fault_server: FaultServer, s3: LocalS3, tmp_path: Path
) -> None:
    fault_server.set_script(503, 200)  # one failed attempt: the upload logs a warning
    prompt = "a lighthouse at dusk, " * 20
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=triton_settings.triton_url,
        TRITON_METRICS_URL=triton_settings.triton_metrics_url,
        UPLOAD_ALLOWED_HOSTS=",".join(triton_settings.upload_allowed_hosts),
        UPLOAD_BACKOFF="0.05,0.1",
        API_KEYS=API_KEY,
        LOG_PROMPT_CHARS="24",
    )
    auth = {"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "req-full-1"}
    body = {
        "prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False,
        "s3_prefix": f"{fault_server.url}/aiu-character/000/1.png{SPEC_QUERY}",
    }
    with gateway:
        status, headers, answer = request("POST", f"{gateway.url}/generate", body, auth)
        assert status == 200, answer
        assert headers["X-Request-ID"] == "req-full-1"
        assert SIGNATURE in answer["data"]["s3_url"]  # the client does get its URL back
        # The key in the query string and a wrong key in the header: refused, not logged.
        status, _, answer = request(
            "POST", f"{gateway.url}/generate?api_key={API_KEY}&Signature={SIGNATURE}", body,
            {"Authorization": f"Bearer wrong-{API_KEY}"},
        )
        assert status == 401 and answer["error"]["code"] == "unauthorized"
        # A valid upload URL to a host that is not allowed: the message names the host only.
        status, _, _ = request(
            "POST", f"{gateway.url}/generate", {**body, "s3_prefix": f"https://other.test/1.png{SPEC_QUERY}"}, auth
        )
        assert status == 400
    output = gateway.output()
    lines = gateway.log_lines()  # every line parses as JSON
    for secret in (API_KEY, SIGNATURE, ACCESS_KEY, "Signature=%2B"):
        assert secret not in output, secret
    mine = [line for line in lines if line.get("request_id") == "req-full-1"]
    assert {line["logger"] for line in mine} >= {"gateway.generate", "gateway.upload.uploader", "gunicorn.access"}
    [generated] = [line for line in mine if line["logger"] == "gateway.generate"]
    assert generated["prompt"].startswith(prompt[:24]) and len(generated["prompt"]) < 40
    accesses = [line for line in lines if line["logger"] == "gunicorn.access"]
    # One access line each, in any order: gunicorn writes a request's line after its response,
    # so the next request's line may come first.
    statuses = [a["status"] for a in accesses if a["path"] == "/generate"]
    assert sorted(statuses) == sorted([200, 401, 400]), statuses
    assert any("NO API KEYS" in line["message"] for line in lines) is False


def test_line_separators_in_a_prompt_stay_inside_one_line() -> None:
    # JSON leaves U+0085, U+2028 and U+2029 as they are; splitlines() and JavaScript break there.
    prompt = "first\u2028second\u2029third\x85fourth, é and 日本"
    line = JsonFormatter().format(record("generated", prompt=prompt))
    assert line.splitlines() == [line]
    assert json.loads(line)["prompt"] == prompt
    assert "é and 日本" in line  # other characters stay readable


def test_a_header_line_without_a_colon_never_reaches_the_log(tmp_path: Path) -> None:
    secret = "s3cr3t-" + "x" * 24
    gateway = GunicornGateway(tmp_path / "gateway.log", TRITON_URL="127.0.0.1:1")
    with gateway:
        for line in (f"Authorization\t{secret}", f"X-Api-Key {secret}", f"{secret}"):
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: t\r\n{line}\r\n\r\n".encode())
                answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    refused = [line for line in gateway.log_lines() if "Invalid request" in line["message"]]
    assert len(refused) == 3 and all("[redacted]" in line["message"] for line in refused), refused
    assert secret not in gateway.output()
