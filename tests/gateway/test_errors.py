"""Failures mapped at the edge, under gunicorn: a chunked body whose framing is broken is the
client's 400 in the usual JSON shape, never a 500 with a traceback in the log."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.process import free_port
from tests.gateway.process import GunicornGateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornGateway]:
    log = tmp_path_factory.mktemp("errors") / "gunicorn.log"
    server = GunicornGateway(log, TRITON_URL=f"127.0.0.1:{free_port()}")  # no Triton needed
    server.start().wait_ready(60)
    yield server
    server.stop()


def exchange(port: int, data: bytes) -> tuple[int, dict[str, object]]:
    """Send raw bytes, read the first answer: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += sock.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body[:length])


def chunked(path: str, content_type: str, chunks: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks


@pytest.mark.parametrize(
    ("path", "content_type", "chunks"),
    [
        ("/generate", "application/json", b"zz\r\n{}\r\n0\r\n\r\n"),  # a size that is not hex
        ("/generate", "application/json", b"2\r\n{}XX0\r\n\r\n"),  # no CRLF after the data
        ("/moderate", "multipart/form-data; boundary=b", b"-1\r\n--b\r\n0\r\n\r\n"),
    ],
    ids=["size-not-hex", "missing-terminator", "negative-size"],
)
def test_a_malformed_chunked_body_is_a_json_400(
    gateway: GunicornGateway, path: str, content_type: str, chunks: bytes
) -> None:
    status, body = exchange(gateway.port, chunked(path, content_type, chunks))
    assert status == 400, body
    assert body == {
        "error": {
            "code": "invalid_request",
            "message": "the request body is malformed: its chunked encoding cannot be read",
        }
    }
    output = Path(gateway.log_path).read_text()  # type: ignore[arg-type]
    assert "Traceback" not in output and "unhandled error" not in output
    # The same worker goes on serving.
    assert exchange(gateway.port, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")[0] == 200
