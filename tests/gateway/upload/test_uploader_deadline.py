"""Each upload attempt's deadline and the budget of all of them, against storage that trickles:
a real server on loopback that answers one byte at a time, slowly enough that no socket timeout
ever fires, for as long as the test holds it. The uploader must give up at its deadline, and
/generate answer the documented 502."""

from __future__ import annotations

import hashlib
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from typing_extensions import Self

from gateway import Settings
from gateway.retry import RetryPolicy
from gateway.upload.egress import PinnedUrl, pin
from gateway.upload.uploader import Uploader
from gateway.upload.urls import check_upload_url
from gateway.vocabulary import UploadOutcome

BODY = b"\xff\xd8\xff" + bytes(range(256)) * 40
MD5 = hashlib.md5(BODY).hexdigest()
# One byte every 20 ms: far inside any socket timeout below, and a whole answer (a 200 whose
# header runs to 20,000 bytes) would take over 6 minutes. A test that passes gave up early.
INTERVAL_S = 0.02
ANSWER = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 20_000 + b"\r\nContent-Length: 0\r\n\r\n"
# A TLS record header announcing 16 KiB of handshake, then the record's bytes, one at a time.
TLS_ANSWER = b"\x16\x03\x03\x40\x00" + bytes(20_000)
# Generous: proves the upload gave up rather than waited out the trickle, whatever the CPU.
GAVE_UP_WITHIN_S = 30.0


class TricklingStorage(socketserver.ThreadingTCPServer):
    """Reads a request (headers and Content-Length body; nothing for TLS) and answers one byte
    every INTERVAL_S until the answer is sent, the client goes away or the test releases it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: bytes, *, tls: bool = False) -> None:
        self.answer = answer
        self.tls = tls
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.cut_off = 0  # connections the client closed before the whole answer went out
        super().__init__(("127.0.0.1", 0), _Trickle)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    @property
    def port(self) -> int:
        return self.server_address[1]

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _Trickle(socketserver.BaseRequestHandler):
    server: TricklingStorage

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        if not self.server.tls:
            self._read_request()
        for i in range(len(self.server.answer)):
            if self.server.released.wait(INTERVAL_S):
                return
            try:
                self.request.sendall(self.server.answer[i : i + 1])
            except OSError:
                with self.server.lock:
                    self.server.cut_off += 1
                return

    def _read_request(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        while len(body) < length:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            body += chunk


@pytest.fixture
def trickling() -> Iterator[TricklingStorage]:
    with TricklingStorage(ANSWER) as server:
        yield server


def pinned(scheme: str, port: int) -> PinnedUrl:
    entry = f"http://127.0.0.1:{port}" if scheme == "http" else f"127.0.0.1:{port}"
    return pin(check_upload_url(f"{scheme}://127.0.0.1:{port}/bucket/{MD5}.jpg?Signature=x", (entry,)))


def test_each_attempt_ends_at_its_deadline(trickling: TricklingStorage) -> None:
    uploader = Uploader(policy=RetryPolicy(backoff=(0.05,)), timeout_s=0.5)
    started = time.monotonic()
    result = uploader.put(pinned("http", trickling.port), BODY, MD5)
    took = time.monotonic() - started
    assert [a.outcome for a in result.attempts] == [UploadOutcome.TIMEOUT] * 2
    assert result.status is None and result.describe() == "upload failed after 2 attempts: timeout"
    assert 2 * 0.5 <= took < GAVE_UP_WITHIN_S, took  # waited out both deadlines, then gave up
    # Both connections were cut off mid-answer by the gateway, not finished by the server.
    wait_for(lambda: trickling.cut_off == 2)
    assert trickling.connections == 2


def test_the_budget_bounds_all_attempts_together(trickling: TricklingStorage) -> None:
    # 4 attempts of 5 s each would be allowed, but the upload as a whole has 0.6 s.
    uploader = Uploader(policy=RetryPolicy(backoff=(0.05, 0.05, 0.05)), timeout_s=5.0, budget_s=0.6)
    started = time.monotonic()
    result = uploader.put(pinned("http", trickling.port), BODY, MD5)
    took = time.monotonic() - started
    assert [a.outcome for a in result.attempts] == [UploadOutcome.TIMEOUT]
    assert 0.6 <= took < GAVE_UP_WITHIN_S, took
    assert trickling.connections == 1


def test_a_tls_handshake_that_trickles_ends_at_the_deadline() -> None:
    with TricklingStorage(TLS_ANSWER, tls=True) as server:
        uploader = Uploader(policy=RetryPolicy(backoff=()), timeout_s=0.5)
        started = time.monotonic()
        result = uploader.put(pinned("https", server.port), BODY, MD5)
        took = time.monotonic() - started
        assert [a.outcome for a in result.attempts] == [UploadOutcome.TIMEOUT]
        assert 0.5 <= took < GAVE_UP_WITHIN_S, took


def test_generate_answers_the_documented_502_when_storage_trickles(
    make_app: Any, triton_settings: Settings, trickling: TricklingStorage
) -> None:
    settings = triton_settings.replace(
        upload_allowed_hosts=(f"http://127.0.0.1:{trickling.port}",),
        upload_timeout_s=0.5,
        upload_backoff=(0.05,),
    )
    client: FlaskClient = make_app(settings).test_client()
    started = time.monotonic()
    response = client.post(
        "/generate",
        json={
            "prompt": "a lighthouse",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "s3_prefix": f"http://127.0.0.1:{trickling.port}/bucket/000/1.png?Signature=x",
        },
    )
    assert time.monotonic() - started < GAVE_UP_WITHIN_S
    assert response.status_code == 502, response.json
    assert response.json["error"] == {
        "code": "upload_failed",
        "message": "upload failed after 2 attempts: timeout",
    }
    assert response.json["data"]["s3_upload_status"] is None  # storage never answered whole
    assert trickling.connections == 2


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)
