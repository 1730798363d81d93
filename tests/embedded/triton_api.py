"""Asking a running Triton for the APIs embedded/drain.py closes, the way a client would and the
way a client cannot: with the closed restriction's own header, written onto the wire by hand
(HTTP/1.1 and HTTP/2), since no HTTP or gRPC library sends a header name with a colon in it.
Shared by the embedded Triton's test and the container entrypoint's."""

from __future__ import annotations

import json
import socket
import struct
import urllib.error
import urllib.request

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedded.drain import CLOSED_HEADER, CLOSED_VALUE

# A region name as the Python backend's own look (the first step of the published chain).
REGION_KEY = "triton_python_backend_shm_region_1"
REGISTER_PATH = "/v2/systemsharedmemory/region/imagegen_probe/register"
REGISTER_BODY = json.dumps({"key": REGION_KEY, "offset": 0, "byte_size": 64}).encode()
# Triton 2.51's answers: HTTP 403 for a restricted API, gRPC UNAVAILABLE ("This protocol is
# restricted").
REFUSED_HTTP, REFUSED_GRPC = 403, "StatusCode.UNAVAILABLE"
# Triton puts this in front of a gRPC restriction's header name (`tritonserver --help`).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
SHM_STATUS_RPC = "/inference.GRPCInferenceService/SystemSharedMemoryStatus"
_TIMEOUT_S = 10


def http_status(url: str, method: str = "POST", body: bytes | None = b"{}",
                headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def grpc_refusal(call: object) -> str:
    """The gRPC status of a call that must fail; an AssertionError if it succeeded."""
    assert callable(call)
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status())
    raise AssertionError("the call succeeded")


def register_over_grpc(grpc_url: str) -> str:
    with grpcclient.InferenceServerClient(grpc_url) as client:
        return grpc_refusal(
            lambda: client.register_system_shared_memory("imagegen_probe", REGION_KEY, 64)
        )


def raw_http1_register(host: str, port: int) -> int:
    """POST the register request with the closed header's exact text as its own header line."""
    request = (
        f"POST {REGISTER_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"{CLOSED_HEADER}:{CLOSED_VALUE}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(REGISTER_BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + REGISTER_BODY
    with socket.create_connection((host, port), timeout=_TIMEOUT_S) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    # HPACK "literal header field without indexing, new name", no Huffman coding: the bytes go
    # out exactly as given, with none of a client library's checks.
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        if len(text) >= 127:
            raise ValueError("a header this long needs a multi-byte HPACK length")
        out += bytes([len(text)]) + text
    return out


def raw_grpc_frames(host: str, port: int, headers: list[tuple[str, str]]) -> list[str]:
    """Send one SystemSharedMemoryStatus call with these extra headers over a hand-written
    HTTP/2 connection; the frame types the server answers the stream with, in order, up to the
    first that ends it: "HEADERS" (an answer, whatever its gRPC status) or "RST_STREAM" (the
    stream refused before any handler saw it)."""
    block = b"".join(_literal(n, v) for n, v in [
        (":method", "POST"), (":scheme", "http"), (":path", SHM_STATUS_RPC),
        (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
        ("te", "trailers"), *headers,
    ])
    names = {1: "HEADERS", 3: "RST_STREAM", 7: "GOAWAY", 0: "DATA"}
    seen: list[str] = []
    with socket.create_connection((host, port), timeout=_TIMEOUT_S) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))  # preface, SETTINGS
        # HEADERS (END_HEADERS), then DATA (END_STREAM) holding an empty gRPC message.
        sock.sendall(_frame(1, 0x4, 1, block) + _frame(0, 0x1, 1, b"\x00" * 5))
        buffer = b""
        for _ in range(100):  # frames; a server that answers at all ends the stream long before
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = sock.recv(65536)
                if not chunk:
                    return seen
                buffer += chunk
            length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            buffer = buffer[9 + length:]
            if kind == 4 and not flags & 0x1:
                sock.sendall(_frame(4, 0x1, 0))  # acknowledge the server's SETTINGS
            if stream == 1 or kind == 7:
                seen.append(names.get(kind, str(kind)))
            if kind in (3, 7) or (kind == 1 and flags & 0x1):  # refused, gone, or trailers
                return seen
    return seen


def closed_grpc_header() -> tuple[str, str]:
    return GRPC_HEADER_PREFIX + CLOSED_HEADER, CLOSED_VALUE
