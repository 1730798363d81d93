"""The client's address behind the front door: `X-Forwarded-For`, believed from trusted peers only.

The front door (deploy/nginx) overwrites `X-Forwarded-For` with the address it accepted the
connection from, never appending what a client sent, so from a trusted peer (the front door, on
loopback: `GATEWAY_TRUSTED_PROXIES`) the header's last address is the client's. From any other
peer the header is whatever a client wrote, and the peer's own address stands. The address is
set on the WSGI environ in place, so gunicorn's access line logs it too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment


class ClientAddress:
    """WSGI middleware: REMOTE_ADDR becomes the forwarded client's when the peer is trusted."""

    def __init__(self, app: WSGIApplication, trusted: Iterable[str]) -> None:
        self.app = app
        self.trusted = tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted)
        # One hop, the address only: the scheme is gunicorn's business (forwarded_allow_ips).
        self.forwarded = ProxyFix(app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)

    def is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        trusted = self.is_trusted(environ.get("REMOTE_ADDR", ""))
        app: WSGIApplication = self.forwarded if trusted else self.app
        return app(environ, start_response)
