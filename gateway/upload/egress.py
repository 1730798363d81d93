"""Where an upload or a webhook may connect: the host of an allowed URL resolved once, every
address checked, and the connection itself, to those addresses only and within a deadline.

The uploader and the webhook sender connect to these addresses and to nothing else, for every
attempt, so a name that resolves somewhere else a moment later (DNS rebinding) cannot move the
request onto an internal service. Allowlist entries that are IP literals may reach loopback and
private addresses (the operator named the address itself); host names, exact or wildcard, reach
public addresses only. Unspecified and multicast addresses are never reached.

Each attempt has a deadline (`Deadline`). Socket timeouts bound one read or write each, so a
server that trickles a byte at a time would hold the attempt (a thread, an in-flight slot) for
as long as it liked: a timer shuts the attempt's socket down when its time is up, which ends any
read, write or TLS handshake at once. A timer per attempt, not a shared watchdog: a thread only
while an attempt runs.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import urllib3
from typing_extensions import Self
from urllib3.connection import HTTPConnection, HTTPSConnection

from gateway.errors import InvalidRequest, Unavailable
from gateway.upload.urls import AllowedUrl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True)
class PinnedUrl(AllowedUrl):
    """An allowed URL whose host was resolved once and every address checked: `connect` goes to
    these addresses, in this order, and to nothing else."""

    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("a pinned URL needs at least one checked address")


def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses in the order the system prefers them (getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal(address: IPAddress, *, exact: bool) -> str | None:
    """Why the gateway must not connect to `address`, or None when it may."""
    # The IPv4 address inside ::ffff:a.b.c.d and 2002:aabb:ccdd:: (6to4) is where packets go.
    forms = [a for a in (_embedded_ipv4(address), address) if a is not None]
    if any(a.is_unspecified or a.is_multicast for a in forms):
        return "an unspecified or multicast address"
    if exact:
        return None
    for a in forms:
        if a.is_loopback:
            return "a loopback address"
        if a.is_link_local:
            return "a link-local address"
        if not a.is_global or a.is_reserved or _site_local(a):
            return "a private or reserved address"
    return None


def pin(
    target: AllowedUrl,
    *,
    resolve: Resolve = system_resolve,
    field: str = "s3_prefix",
    retry_after_s: int = 5,
    setting: str = "GATEWAY_UPLOAD_ALLOWED_HOSTS",
) -> PinnedUrl:
    """Resolve `target`'s host once; refuse it (400 naming `field`) unless every address passes.
    `setting` is the allowlist that let it through, named in the refusal.

    A resolver that cannot answer right now (EAI_AGAIN) is a 503: the same request may pass later.
    """
    try:
        addresses = [str(_address(a)) for a in resolve(target.host, target.port)]
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise Unavailable(
                f"the host of {field} cannot be resolved right now; retry later",
                retry_after=retry_after_s,
            ) from None
        raise InvalidRequest(f"the host of {field} does not resolve", field=field) from None
    except (OSError, ValueError):  # UnicodeError (an unencodable name) is a ValueError
        raise InvalidRequest(f"the host of {field} does not resolve", field=field) from None
    if not addresses:
        raise InvalidRequest(f"the host of {field} does not resolve", field=field)
    for address in addresses:
        reason = refusal(_address(address), exact=target.exact)
        if reason is not None:
            hint = (
                ""
                if target.exact
                else f" (only addresses listed as IP literals in {setting} may)"
            )
            raise InvalidRequest(
                f"the host of {field} resolves to {reason}, which the gateway does not send "
                f"to{hint}",
                field=field,
            )
    return PinnedUrl(**vars(target), addresses=tuple(addresses))


class Deadline:
    """Shuts down the socket of one attempt once `seconds` have passed."""

    def __init__(self, seconds: float) -> None:
        # Also every socket operation's timeout: the timer cannot reach a socket still connecting.
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        """The attempt's socket, as soon as it is connected (before any TLS handshake)."""
        with self._lock:
            self._socket = sock
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._socket is not None:
                _shut(self._socket)


def connect(
    target: PinnedUrl, deadline: Deadline, ssl_context: ssl.SSLContext | None = None
) -> HTTPConnection:
    """A connection to the first checked address that takes one, in the resolver's order, its
    socket watched by `deadline`. https keeps SNI and the certificate check on the URL's host
    name while the connection goes to the address."""
    if not isinstance(target, PinnedUrl):  # a caller past the type checker connects nowhere
        raise TypeError("the target has no checked address: pin() it first")
    *others, last = target.addresses  # a PinnedUrl has at least one
    for address in others:
        conn = _connection(target, address, deadline, ssl_context)
        try:
            conn.connect()
        except urllib3.exceptions.ConnectTimeoutError:  # refused, unreachable or timed out
            conn.close()
            continue
        except BaseException:
            conn.close()
            raise
        return conn
    conn = _connection(target, last, deadline, ssl_context)
    try:
        conn.connect()
    except BaseException:
        conn.close()
        raise
    return conn


class _WatchedHTTPConnection(HTTPConnection):
    deadline: Deadline

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.deadline.watch(sock)
        return sock


class _WatchedHTTPSConnection(HTTPSConnection):
    deadline: Deadline

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self.deadline.watch(sock)
        return sock


def _connection(
    target: PinnedUrl, address: str, deadline: Deadline, ssl_context: ssl.SSLContext | None
) -> HTTPConnection:
    conn: _WatchedHTTPConnection | _WatchedHTTPSConnection
    if target.scheme.lower() == "https":
        conn = _WatchedHTTPSConnection(
            address,
            target.port,
            timeout=deadline.seconds,
            ssl_context=ssl_context,
            cert_reqs="CERT_REQUIRED",
            # SNI and the certificate's name check use the host name, not the address.
            server_hostname=target.host,
        )
    else:
        conn = _WatchedHTTPConnection(address, target.port, timeout=deadline.seconds)
    conn.deadline = deadline
    return conn


def _shut(sock: socket.socket) -> None:
    # shutdown, not close: the blocked call returns at once, and the descriptor stays the
    # connection's to close (no other thread can be handed the same number meanwhile).
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass

def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not part


def _site_local(address: IPAddress) -> bool:
    # fec0::/10 (deprecated, RFC 3879, yet routed inside some networks) is global to `ipaddress`.
    return isinstance(address, ipaddress.IPv6Address) and address.is_site_local


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address.sixtofour
    return None
