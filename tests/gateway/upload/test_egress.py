"""Where an upload may connect: the address policy, resolving once (no DNS-rebinding window) and
https bound to the host name while the connection goes to the checked address. Real sockets on
loopback only; fake resolvers stand in for DNS, which these machines may not reach."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import InvalidRequest, Unavailable
from gateway.retry import RetryPolicy
from gateway.upload.egress import pin, refusal, system_resolve
from gateway.upload.uploader import Uploader
from gateway.upload.urls import (
    AllowedUrl,
    UploadUrl,
    check_upload_url,
    parse_upload_url,
    rewrite_url,
)
from tests.gateway.faults import FaultServer, Trap

BODY = b"\xff\xd8\xff" + b"jpeg" * 100
MD5 = hashlib.md5(BODY).hexdigest()
FAST = RetryPolicy(backoff=(0.01, 0.01, 0.01))


class Resolver:
    """Answers from a script (one answer per call, the last repeating) and counts its calls."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


@pytest.mark.parametrize(
    ("address", "exact", "refused"),
    [
        ("93.184.215.14", False, None),
        ("2606:4700::1111", False, None),
        ("127.0.0.1", False, "loopback"),
        ("127.0.0.1", True, None),  # listed exactly: the operator's own local storage
        ("::1", False, "loopback"),
        ("::ffff:127.0.0.1", False, "loopback"),  # IPv4-mapped IPv6
        ("::ffff:10.1.2.3", False, "private"),
        ("2002:7f00:1::", False, "loopback"),  # 6to4 around 127.0.0.1
        ("10.0.0.8", False, "private"),
        ("172.16.5.4", False, "private"),
        ("192.168.1.1", False, "private"),
        ("100.64.0.1", False, "private"),  # carrier-grade NAT
        ("fc00::1", False, "private"),
        ("fec0::1", False, "private or reserved"),  # site-local: `ipaddress` calls it global
        ("fec0::1", True, None),  # listed exactly, as an IP literal
        ("169.254.169.254", False, "link-local"),  # cloud metadata
        ("fe80::1", False, "link-local"),
        ("240.0.0.1", False, "private or reserved"),
        ("0.0.0.0", False, "unspecified"),
        ("0.0.0.0", True, "unspecified"),  # never, not even listed exactly
        ("::", True, "unspecified"),
        ("224.0.0.1", True, "multicast"),
        ("ff02::1", True, "multicast"),
        ("::ffff:224.0.0.1", True, "multicast"),
    ],
)
def test_address_policy(address: str, exact: bool, refused: str | None) -> None:
    reason = refusal(ipaddress.ip_address(address), exact=exact)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def target(url: str, allowed: tuple[str, ...]) -> UploadUrl:
    return check_upload_url(url, allowed)


def vouched(url: str) -> AllowedUrl:
    """`url` let through with the trust an IP-literal entry gives: these tests' host names stand
    for public storage, yet resolve to loopback, where their servers listen."""
    return AllowedUrl(**vars(parse_upload_url(url)), exact=True)


def test_a_wildcard_host_that_resolves_to_loopback_is_refused() -> None:
    with pytest.raises(InvalidRequest) as err:
        pin(target("https://a.storage.test/1.png", ("*.storage.test",)), resolve=Resolver(["127.0.0.1"]))
    assert err.value.field == "s3_prefix" and "loopback" in err.value.message
    assert "127.0.0.1" not in err.value.message  # internal DNS answers are not echoed


def test_every_address_is_checked_not_just_the_first() -> None:
    resolve = Resolver(["93.184.215.14", "169.254.169.254"])
    with pytest.raises(InvalidRequest, match="link-local"):
        pin(target("https://a.storage.test/1.png", ("*",)), resolve=resolve)


def test_an_ip_literal_entry_may_reach_loopback_and_the_addresses_are_kept() -> None:
    for host, entry in (("[::1]", "http://[::1]:9000"), ("127.0.0.1", "http://127.0.0.1:9000")):
        pinned = pin(target(f"http://{host}:9000/1.png", (entry,)), resolve=system_resolve)
        assert pinned.addresses == (host.strip("[]"),)
        assert rewrite_url(pinned, MD5, "rewrite").addresses == pinned.addresses


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.0.0.8", "169.254.169.254", "fec0::1"])
def test_a_host_name_listed_exactly_keeps_the_private_address_checks(address: str) -> None:
    # Only an IP literal is the operator vouching for an address; a name resolves wherever its
    # DNS says, so it gets the same checks as a wildcard.
    with pytest.raises(InvalidRequest) as err:
        pin(
            target("http://storage.test:9000/1.png", ("http://storage.test:9000",)),
            resolve=Resolver([address]),
        )
    assert err.value.field == "s3_prefix" and "IP literals" in err.value.message
    public = pin(
        target("http://storage.test:9000/1.png", ("http://storage.test:9000",)),
        resolve=Resolver(["93.184.215.14"]),
    )
    assert public.addresses == ("93.184.215.14",)


def test_names_that_do_not_resolve_are_400_and_a_dns_outage_is_503() -> None:
    def fail(code: int):  # type: ignore[no-untyped-def]
        def resolve(host: str, port: int) -> list[str]:
            raise socket.gaierror(code, "lookup failed")

        return resolve

    url = target("https://a.storage.test/1.png", ("*.storage.test",))
    with pytest.raises(InvalidRequest, match="does not resolve"):
        pin(url, resolve=fail(socket.EAI_NONAME))
    with pytest.raises(Unavailable) as err:
        pin(url, resolve=fail(socket.EAI_AGAIN), retry_after_s=7)
    assert err.value.retry_after == 7
    with pytest.raises(InvalidRequest, match="does not resolve"):
        pin(url, resolve=Resolver([]))


def test_the_system_resolver_answers_addresses() -> None:
    assert "127.0.0.1" in system_resolve("localhost", 80)
    assert system_resolve("127.0.0.1", 80) == ["127.0.0.1"]


def test_dns_rebinding_cannot_move_the_upload(fault_server: FaultServer) -> None:
    """The name resolves to the allowed storage when checked and elsewhere afterwards (a
    rebinding attacker's DNS): every attempt still goes to the address that was checked."""
    trap = Trap("127.0.0.2", fault_server.port)  # same port: only the address tells them apart
    try:
        resolve = Resolver(["127.0.0.1"], ["127.0.0.2"])
        url = f"http://rebind.test:{fault_server.port}/b/1.png?Signature=x"
        pinned = pin(vouched(url), resolve=resolve)
        fault_server.set_script(503, 503, 200)
        result = Uploader(policy=FAST, timeout_s=2).put(rewrite_url(pinned, MD5, "rewrite"), BODY, MD5)
        assert result.ok and len(result.attempts) == 3
        assert len(fault_server.requests) == 3
        assert trap.connections == 0
        assert resolve.calls == 1
        # The Host header is still the name the client's URL was signed for.
        hosts = {r.headers["Host"] for r in fault_server.requests}
        assert hosts == {f"rebind.test:{fault_server.port}"}
    finally:
        trap.stop()


def test_the_next_checked_address_is_tried_when_one_refuses(fault_server: FaultServer) -> None:
    # Nothing listens on 127.0.0.3 at the fault server's port: refused, then 127.0.0.1 answers.
    url = f"http://two.test:{fault_server.port}/b/1.png"
    pinned = pin(vouched(url), resolve=Resolver(["127.0.0.3", "127.0.0.1"]))
    result = Uploader(policy=RetryPolicy(backoff=()), timeout_s=2).put(pinned, BODY, MD5)
    assert result.ok and len(fault_server.requests) == 1


class Pki:
    """A throwaway CA and server certificates signed by it, written as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagegen test CA")])
        self.cert = (
            self._builder(name, self.key.public_key())
            .issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def server_context(self, dns_name: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]), key.public_key())
            .issuer_name(self.cert.subject)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = self.directory / f"{dns_name}.pem", self.directory / f"{dns_name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def https_server(context: ssl.SSLContext, names_seen: list[str | None]) -> FaultServer:
    context.sni_callback = lambda sock, name, ctx: names_seen.append(name)  # type: ignore[assignment,misc]
    return FaultServer(tls=context).start()


def test_https_goes_to_the_checked_address_with_sni_and_certificate_of_the_name(pki: Pki) -> None:
    sni: list[str | None] = []
    server = https_server(pki.server_context("storage.test"), sni)
    try:
        url = f"https://storage.test:{server.port}/b/1.png?Signature=%2Bx"
        pinned = pin(vouched(url), resolve=Resolver(["127.0.0.1"]))
        uploader = Uploader(policy=FAST, timeout_s=2, ssl_context=pki.client_context())
        result = uploader.put(rewrite_url(pinned, MD5, "rewrite"), BODY, MD5)
        assert result.ok, result.attempts
        [received] = server.requests
        assert sni == ["storage.test"]
        assert received.headers["Host"] == f"storage.test:{server.port}"
        assert received.target == f"/b/{MD5}.jpg?Signature=%2Bx"
        assert received.body == BODY
    finally:
        server.stop()


def test_a_certificate_for_another_name_fails_and_is_not_retried(pki: Pki) -> None:
    sni: list[str | None] = []
    server = https_server(pki.server_context("other.test"), sni)
    try:
        url = f"https://storage.test:{server.port}/b/1.png"
        pinned = pin(vouched(url), resolve=Resolver(["127.0.0.1"]))
        uploader = Uploader(policy=FAST, timeout_s=2, ssl_context=pki.client_context())
        result = uploader.put(pinned, BODY, MD5)
        assert not result.ok
        assert [a.outcome for a in result.attempts] == ["tls_error"]
        assert sni == ["storage.test"]  # the name was asked for, and the answer refused
        assert server.requests == []
    finally:
        server.stop()


def test_an_unpinned_target_is_never_connected(fault_server: FaultServer) -> None:
    url = f"{fault_server.url}/b/1.png"
    unpinned = target(url, (f"http://{fault_server.hostport}",))
    with pytest.raises(TypeError, match="no checked address"):
        Uploader(policy=FAST, timeout_s=2).put(unpinned, BODY, MD5)
    assert fault_server.requests == []
