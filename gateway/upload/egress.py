"""Where an upload may connect: the host of an allowed URL resolved once, every address checked.

The uploader connects to these addresses and to nothing else, for every attempt, so a name that
resolves somewhere else a moment later (DNS rebinding) cannot move the PUT onto an internal
service. Allowlist entries that are IP literals may reach loopback and private addresses (the
operator named the address itself); host names, exact or wildcard, reach public addresses only.
Unspecified and multicast addresses are never reached.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.errors import InvalidRequest, Unavailable
from gateway.upload.urls import AllowedUrl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True)
class PinnedUrl(AllowedUrl):
    """An allowed URL whose host was resolved once and every address checked: the uploader
    connects to these addresses, in this order, and to nothing else."""

    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("a pinned upload URL needs at least one checked address")


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
) -> PinnedUrl:
    """Resolve `target`'s host once; refuse it (400 naming `field`) unless every address passes.

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
                else " (only addresses listed as IP literals in GATEWAY_UPLOAD_ALLOWED_HOSTS may)"
            )
            raise InvalidRequest(
                f"the host of {field} resolves to {reason}, which the gateway does not upload "
                f"to{hint}",
                field=field,
            )
    return PinnedUrl(**vars(target), addresses=tuple(addresses))


def _address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not part


def _site_local(address: IPAddress) -> bool:
    # fec0::/10 (deprecated, RFC 3879, yet routed inside some networks) is global to `ipaddress`.
    return isinstance(address, ipaddress.IPv6Address) and address.is_site_local


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address.sixtofour
    return None
