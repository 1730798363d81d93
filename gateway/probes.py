"""Probes and scrapes on a listener of their own in every gunicorn worker.

gunicorn's gthread worker serves every request from one pool of GATEWAY_THREADS threads, in the
order they come: behind a queue of client requests, even quick ones, a probe waits its turn
(measured: /healthz answered in 0.7-0.9 s while 200 clients asked for /openapi.json, against
2 ms idle; docs/security.md, "The front door"). Generations hold their threads for minutes. So
each worker also listens on GATEWAY_PROBE_PORT, with threads of its own, for `/healthz`,
`/readyz` and `/metrics` only; the front door's probe port proxies to it, and the Kubernetes
probes and the Prometheus scrape use that port. The workers share the port (SO_REUSEPORT), as
they share gunicorn's: whichever answers, the metrics are summed over all of them.

Only the front door connects (the listener is on GATEWAY_HOST, loopback), with whole requests.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_NOT_HERE = (
    b'{"error":{"code":"not_found","message":"this port serves /healthz, /readyz and /metrics '
    b'only"}}'
)


class _QuietHandler(WSGIRequestHandler):
    """The app records each request in its metrics; no werkzeug line per probe."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def only_probes(app: WSGIApplication) -> WSGIApplication:
    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in PROBE_PATHS and environ["REQUEST_METHOD"] in {"GET", "HEAD"}:
            return app(environ, start_response)
        start_response(
            "404 NOT FOUND",
            [("Content-Type", "application/json"), ("Content-Length", str(len(_NOT_HERE)))],
        )
        return [_NOT_HERE]

    return serve


def serve_probes(app: WSGIApplication, host: str, port: int) -> BaseWSGIServer:
    """Serve `app`'s probes on host:port from a daemon thread; returns the server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Every worker of this gunicorn binds the same port; the kernel spreads connections.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(64)
        server = make_server(
            host, port, only_probes(app), threaded=True, request_handler=_QuietHandler,
            fd=listener.fileno(),
        )
    finally:
        listener.close()  # the server holds its own copy of the socket
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
