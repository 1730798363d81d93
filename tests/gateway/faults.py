"""A scripted HTTP server standing in for storage that misbehaves.

It records every request it receives (raw request target, headers, body, arrival time) and
answers with the next action of its script; the last action repeats once the script runs out.
Actions: an int status (2xx answers carry an S3-style ETag with the body's MD5), `Respond`
for full control (a delay included), `held()` (an answer that waits for the test's `release()`),
`HANG` (read the request, never answer) and `CLOSE` (drop the connection). `unanswered` counts
the requests still waiting for their answer. With an `ssl.SSLContext` it serves https. `Trap`
only counts connections: where it listens, nothing may ever connect.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from harness.httpserver import BackgroundHTTPServer


@dataclass(frozen=True)
class Respond:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    etag: str | None = "md5"  # "md5": the body's MD5, like S3; None: no ETag; else verbatim
    delay_s: float = 0.0  # wait this long after reading the request before answering


# The longest an answer waits for `release()`: longer than any test holds one, short enough that a
# test that never releases does not leave a thread behind for the session.
HELD_S = 600.0


def held(status: int = 200) -> Respond:
    """An answer (`status`) given only once the test calls `release()` (or stops the server)."""
    return Respond(status, delay_s=HELD_S)


HANG = "hang"
CLOSE = "close"
Action = int | Respond | str


@dataclass(frozen=True)
class Received:
    method: str
    target: str  # exactly as on the request line
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request line arrived


@dataclass
class FaultServer(BackgroundHTTPServer):
    host: str = "127.0.0.1"
    script: list[Action] = field(default_factory=lambda: [200])
    requests: list[Received] = field(default_factory=list)
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._next = 0
        self._unanswered = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                arrived = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = server._record(
                    Received(self.command, self.path, dict(self.headers.items()), body, arrived)
                )
                try:
                    self._act(action, body)
                finally:
                    server._answered()

            def _act(self, action: Action, body: bytes) -> None:
                if action == HANG:
                    server._released.wait(60)
                    self.close_connection = True
                    return
                if action == CLOSE:
                    self.close_connection = True
                    return
                reply = action if isinstance(action, Respond) else Respond(int(action))
                if reply.delay_s:
                    server._released.wait(reply.delay_s)
                payload = reply.body
                if not payload and reply.status >= 300:
                    payload = f"<Error><Code>Fault{reply.status}</Code></Error>".encode()
                self.send_response(reply.status)
                if 200 <= reply.status < 300 and reply.etag is not None:
                    etag = hashlib.md5(body).hexdigest() if reply.etag == "md5" else reply.etag
                    self.send_header("ETag", f'"{etag}"' if reply.etag == "md5" else etag)
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_PUT = do_GET = do_POST = do_HEAD = do_DELETE = _handle

        self._listen(Handler, self.tls)

    def _record(self, received: Received) -> Action:
        with self._lock:
            self.requests.append(received)
            self._unanswered += 1
            action = self.script[min(self._next, len(self.script) - 1)]
            self._next += 1
            return action

    def _answered(self) -> None:
        with self._lock:
            self._unanswered -= 1

    @property
    def unanswered(self) -> int:
        """Requests received and not answered yet (held, hanging or delayed): a client that has
        its own answer while this is above 0 did not wait for this server's."""
        with self._lock:
            return self._unanswered

    def set_script(self, *actions: Action) -> None:
        with self._lock:
            self.script = list(actions)
            self._next = 0

    def gaps(self) -> list[float]:
        """Seconds between consecutive requests' arrivals."""
        times = [r.at for r in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]

    def release(self) -> None:
        """Let every held answer (`HANG`, a `Respond` delay) go now, and later ones at once."""
        self._released.set()

    def stop(self) -> None:
        self._released.set()  # let hanging handlers go
        super().stop()


class Trap:
    """A listening socket that accepts and counts connections, and never answers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self.connections = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._sock.close()
