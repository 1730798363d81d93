"""GATEWAY_TRITON_URL: the forms it takes, and finding a name's addresses again (the system's
resolver, or a DNS server on loopback that the test controls)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from embedded.process import free_port
from gateway import Settings
from gateway.settings import SettingsError
from gateway.triton.target import DnsTarget, Endpoint, FixedTarget, ResolutionError, parse_target
from harness.dnsserver import LoopbackDns


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:8001", FixedTarget((Endpoint("ipv4:127.0.0.1:8001", "127.0.0.1:8001"),))),
        ("[::1]:8001", FixedTarget((Endpoint("ipv6:[::1]:8001", "[::1]:8001"),))),
        ("triton:8001", DnsTarget("triton", 8001)),
        ("dns:///triton:8001", DnsTarget("triton", 8001)),
        ("dns:triton.imagegen.svc.cluster.local:8001", DnsTarget("triton.imagegen.svc.cluster.local", 8001)),
        ("dns://127.0.0.1:5353/triton.test:8001", DnsTarget("triton.test", 8001, ("127.0.0.1", 5353))),
        ("dns://10.96.0.10/triton:8001", DnsTarget("triton", 8001, ("10.96.0.10", 53))),
        ("dns:///10.0.0.5:8001", FixedTarget((Endpoint("ipv4:10.0.0.5:8001", "10.0.0.5:8001"),))),
        ("triton", DnsTarget("triton", 443)),  # gRPC's default port
        (
            "ipv4:127.0.0.1:1,127.0.0.2:2",
            FixedTarget((Endpoint("ipv4:127.0.0.1:1", "127.0.0.1:1"), Endpoint("ipv4:127.0.0.2:2", "127.0.0.2:2"))),
        ),
        ("ipv6:[::1]:5,[fe80::1]:6", FixedTarget((Endpoint("ipv6:[::1]:5", "[::1]:5"), Endpoint("ipv6:[fe80::1]:6", "[fe80::1]:6")))),
        ("unix:/run/triton.sock", FixedTarget((Endpoint("unix:/run/triton.sock", "unix:/run/triton.sock"),))),
    ],
)
def test_the_forms_grpc_takes(url: str, expected: object) -> None:
    assert parse_target(url) == expected


@pytest.mark.parametrize(
    "url",
    ["", "http://triton:8001", "triton:0", "triton:65536", "triton:x", "tri ton:8001",
     "dns://triton/x:8001", "dns://127.0.0.1", "ipv4:triton:8001", "ipv4:::1:8001",
     "ipv6:127.0.0.1:1", "ipv4:127.0.0.1:1,", "[::1:8001", "unix:"],
)
def test_what_is_not_a_target_stops_the_gateway_at_start(url: str) -> None:
    with pytest.raises(ValueError):
        parse_target(url)
    with pytest.raises(SettingsError, match="GATEWAY_TRITON_URL"):
        Settings.from_env({"GATEWAY_TRITON_URL": url})
    with pytest.raises(SettingsError, match="GATEWAY_TRITON_URL"):
        Settings(triton_url=url)


def test_the_refresh_interval_is_a_setting() -> None:
    assert Settings.from_env({}).triton_refresh_s == 5.0
    assert Settings.from_env({"GATEWAY_TRITON_REFRESH_S": "1.5"}).triton_refresh_s == 1.5
    for bad in ("0", "-1", "301"):
        with pytest.raises(SettingsError, match="TRITON_REFRESH_S"):
            Settings.from_env({"GATEWAY_TRITON_REFRESH_S": bad})


def test_a_dns_server_s_answers_as_they_change(dns: LoopbackDns) -> None:
    target = parse_target(dns.target("triton.test", 8001))
    dns.set("triton.test", ["127.0.0.3", "127.0.0.2", "::1"])
    assert [e.label for e in target.resolve(2)] == ["127.0.0.2:8001", "127.0.0.3:8001", "[::1]:8001"]
    dns.set("triton.test", ["127.0.0.3"])
    assert [e.grpc_target for e in target.resolve(2)] == ["ipv4:127.0.0.3:8001"]
    dns.set("triton.test", [])  # the name exists, with no address: no replica
    assert target.resolve(2) == ()
    dns.remove("triton.test")  # NXDOMAIN: no replica either
    assert target.resolve(2) == ()
    assert dns.queries("triton.test") >= 8  # A and AAAA, every time


def test_a_dns_server_that_does_not_answer_is_not_an_empty_answer() -> None:
    silent = DnsTarget("triton.test", 8001, ("127.0.0.1", free_port()))
    with pytest.raises(ResolutionError):
        silent.resolve(0.5)


def test_the_system_resolver() -> None:
    found = DnsTarget("localhost", 8001).resolve(2)
    assert Endpoint.ip("127.0.0.1", 8001) in found
    # .invalid never resolves (RFC 6761): no replica, not a failure to resolve.
    assert DnsTarget("no-such-triton.invalid", 8001).resolve(2) == ()
