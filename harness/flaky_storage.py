"""A flaky storage front: an HTTP proxy before the local S3 that fails on purpose.

Each request draws one action from a seeded random stream: answer 503 itself (nothing stored),
reset the connection before forwarding (nothing stored), forward and then reset (stored, but the
client never hears so), delay and then forward, or simply forward. The request goes upstream with
its exact target (query string byte for byte) and body; the answer comes back as upstream gave it.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from harness.httpserver import BackgroundHTTPServer


@dataclass(frozen=True)
class Faults:
    unavailable: float = 0.30  # answer 503 SlowDown
    reset_before: float = 0.04  # drop the connection before forwarding
    reset_after: float = 0.04  # forward, then drop the connection instead of answering
    delay: float = 0.10  # wait delay_s[0]..delay_s[1] seconds, then forward
    delay_s: tuple[float, float] = (0.2, 1.5)


@dataclass
class FlakyStorage(BackgroundHTTPServer):
    upstream: str  # e.g. http://127.0.0.1:9000
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    host: str = "127.0.0.1"
    actions: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        upstream = urlsplit(self.upstream)
        if not (upstream.hostname and upstream.port):
            raise ValueError(f"the upstream needs a host and a port: {self.upstream!r}")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action, delay = proxy._draw()
                if action == "unavailable":
                    self._answer(503, b"<Error><Code>SlowDown</Code></Error>", ())
                    return
                if action == "reset_before":
                    self._reset()
                    return
                if action == "delay":
                    time.sleep(delay)
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = upstream.netloc
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    kept = [
                        (k, v) for k, v in response.getheaders() if k.lower() in ("etag", "content-type")
                    ]
                finally:
                    conn.close()
                if action == "reset_after":
                    self._reset()
                    return
                self._answer(response.status, payload, kept)

            def _answer(self, status: int, payload: bytes, headers: Iterable[tuple[str, str]]) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client timed out and left: its retry comes

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST instead of FIN, as a crashing server would.
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.close_connection = True

            do_PUT = do_GET = do_HEAD = _handle

        self._listen(Handler)

    def _draw(self) -> tuple[str, float]:
        f = self.faults
        with self._lock:
            roll = self._random.random()
            delay = self._random.uniform(*f.delay_s)
            action = "forward"
            for name, share in (
                ("unavailable", f.unavailable),
                ("reset_before", f.reset_before),
                ("reset_after", f.reset_after),
                ("delay", f.delay),
            ):
                if roll < share:
                    action = name
                    break
                roll -= share
            self.actions[action] += 1
        return action, delay
