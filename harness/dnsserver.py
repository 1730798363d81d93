"""A DNS server on loopback whose answers its owner sets: the name several Triton replicas hide
behind, as a Kubernetes headless Service or a compose service name is.

    dns = LoopbackDns().start()
    dns.set("triton.test", ["127.0.0.2", "127.0.0.3"])
    url = f"dns://{dns.hostport}/triton.test:{port}"   # GATEWAY_TRITON_URL, gRPC's URI form

It answers A and AAAA queries over UDP (dnslib's server), with a TTL of 0 so no cache keeps an
old answer; a name it does not know is NXDOMAIN. `queries` counts what it was asked.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from typing import Any, Self

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from embedded.process import free_port


class _Records(BaseResolver):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, tuple[str, ...]] = {}
        self.queries: Counter[str] = Counter()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries[name] += 1
            addresses = self.names.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if qtype == "A" and ip.version == 4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
            elif qtype == "AAAA" and ip.version == 6:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=0))
        return reply


class LoopbackDns:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self._records = _Records()
        self.port = free_port(self.host)
        # dnslib logs every query to stdout by default; the tests only want failures.
        self._server = DNSServer(
            self._records, address=self.host, port=self.port, logger=DNSLogger("-request,-reply,-truncated")
        )

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def target(self, name: str, port: int) -> str:
        """The gRPC target for `name:port` resolved by this server."""
        return f"dns://{self.hostport}/{name}:{port}"

    def set(self, name: str, addresses: list[str] | tuple[str, ...]) -> None:
        """What `name` resolves to from now on; an empty list still exists (no records)."""
        with self._records.lock:
            self._records.names[name.lower()] = tuple(addresses)

    def remove(self, name: str) -> None:
        with self._records.lock:
            self._records.names.pop(name.lower(), None)

    def queries(self, name: str) -> int:
        with self._records.lock:
            return self._records.queries[name.lower()]

    def start(self) -> Self:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()
