"""GATEWAY_TRITON_URL: which Triton replicas it names, and how to find their addresses again.

The value is a gRPC target, in the forms gRPC itself takes:

    host:port, [v6]:port             a name (resolved by the system, again and again) or an IP
    dns:///name:port                 the same, spelled as a URI
    dns://10.0.0.2:53/name:port      resolved by that DNS server (gRPC's authority form)
    ipv4:a:port,b:port               fixed addresses (ipv6:[a]:port,... likewise)
    unix:/path, unix-abstract:, vsock:   one fixed endpoint, handed to gRPC as it is

A port left out is 443, gRPC's default. Parsing pulls in nothing heavy: the settings check the
value in gunicorn's master, which must not import gRPC before the workers fork.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

_GRPC_DEFAULT_PORT = 443
_DNS_PORT = 53
_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_OPAQUE_SCHEMES = ("unix", "unix-abstract", "vsock")


class ResolutionError(OSError):
    """The resolver could not answer now (a timeout, a server failure): not "no such name"."""


@dataclass(frozen=True, order=True)
class Endpoint:
    """One replica: how gRPC reaches it, and how metrics and /readyz name it."""

    grpc_target: str  # `ipv4:10.0.0.5:8001`: gRPC connects there without resolving anything
    label: str  # `10.0.0.5:8001`

    @classmethod
    def ip(cls, address: str, port: int) -> Endpoint:
        ip = ipaddress.ip_address(address)
        if ip.version == 6:
            return cls(f"ipv6:[{ip.compressed}]:{port}", f"[{ip.compressed}]:{port}")
        return cls(f"ipv4:{ip.compressed}:{port}", f"{ip.compressed}:{port}")


@dataclass(frozen=True)
class FixedTarget:
    """Addresses that never change (IP literals, or a socket path)."""

    endpoints: tuple[Endpoint, ...]

    def resolve(self, timeout_s: float) -> tuple[Endpoint, ...]:
        return self.endpoints


@dataclass(frozen=True)
class DnsTarget:
    """A name whose addresses are the replicas; `server` None asks the system's resolver."""

    name: str
    port: int
    server: tuple[str, int] | None = None

    def resolve(self, timeout_s: float) -> tuple[Endpoint, ...]:
        """Every address of the name now, sorted; empty when the name has none (NXDOMAIN, no
        records: there is no replica); ResolutionError when the resolver cannot say."""
        if self.server is None:
            addresses = self._system()
        else:
            addresses = _ask_server(self.name, self.server, timeout_s)
        return tuple(sorted({Endpoint.ip(a, self.port) for a in addresses}))

    def _system(self) -> list[str]:
        # getaddrinfo, like gRPC's native resolver: /etc/hosts and the search domains of
        # resolv.conf apply, as they do for every other client on the host or in the pod.
        try:
            infos = socket.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []
            raise ResolutionError(f"cannot resolve {self.name}: {exc}") from None
        return [str(info[4][0]).split("%", 1)[0] for info in infos]


def _ask_server(name: str, server: tuple[str, int], timeout_s: float) -> list[str]:
    # Imported here: only a target that names its DNS server needs dnspython.
    import dns.exception
    import dns.name
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(dns.name.from_text(name), rdtype, lifetime=timeout_s)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise ResolutionError(f"cannot resolve {name} at {server[0]}: {exc}") from None
        found += [record.address for record in answer]
    return found


Target = FixedTarget | DnsTarget


def parse_target(text: str) -> Target:
    """The replicas a GATEWAY_TRITON_URL names; ValueError saying why when it is not a target."""
    value = text.strip()
    scheme, colon, rest = value.partition(":")
    if colon and scheme in ("ipv4", "ipv6"):
        parts = [part.strip() for part in rest.split(",")]
        if not all(parts):
            raise ValueError(f"{value!r}: an empty address in the list")
        endpoints = []
        for part in parts:
            host, port = _host_port(part)
            if not _is_ip(host, 4 if scheme == "ipv4" else 6):
                raise ValueError(f"{value!r}: {host!r} is not an {scheme.upper()} address")
            endpoints.append(Endpoint.ip(host, port))
        return FixedTarget(tuple(endpoints))
    if colon and scheme in _OPAQUE_SCHEMES:
        if not rest.strip("/"):
            raise ValueError(f"{value!r}: no path")
        return FixedTarget((Endpoint(value, value),))
    server = None
    if colon and scheme == "dns":
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"{value!r}: expected dns://[server[:port]]/name:port")
            if authority:
                host, port = _host_port(authority, default=_DNS_PORT)
                if not _is_ip(host):
                    raise ValueError(f"{value!r}: the DNS server must be an IP address")
                server = (host, port)
    elif "/" in value or not value:
        raise ValueError(f"{value!r} is not a gRPC target (host:port, dns:///name:port, ipv4:...)")
    else:
        rest = value
    host, port = _host_port(rest)
    if _is_ip(host):
        return FixedTarget((Endpoint.ip(host, port),))
    if not _NAME.fullmatch(host):
        raise ValueError(f"{value!r}: {host!r} is not a host name")
    return DnsTarget(host, port, server)


def _host_port(text: str, default: int = _GRPC_DEFAULT_PORT) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{text!r} is not [address]:port")
        port_text = tail[1:] if tail else ""
    elif text.count(":") > 1:  # a bare IPv6 address, as gRPC's ipv6: scheme allows
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be 1..65535")
    return host, int(port_text)


def _is_ip(host: str, version: int | None = None) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or ip.version == version
