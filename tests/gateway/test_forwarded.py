"""The client's address behind the front door: X-Forwarded-For believed from trusted peers only,
its last address taken, and the address set where gunicorn's access line reads it."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.forwarded import ClientAddress

LOOPBACK = ("127.0.0.1", "::1")


def seen(peer: str, forwarded: str | None, trusted: tuple[str, ...] = LOOPBACK) -> dict[str, Any]:
    """The environ the app saw, and (the same dict) what the access line reads afterwards."""
    environ: dict[str, Any] = {"REMOTE_ADDR": peer}
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    inner: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        inner.update(env)
        return [b""]

    ClientAddress(app, trusted)(environ, lambda *a: None)  # type: ignore[arg-type]
    assert environ["REMOTE_ADDR"] == inner["REMOTE_ADDR"]  # in place: gunicorn logs it
    return environ


def test_from_the_front_door_the_forwarded_address_is_the_clients() -> None:
    assert seen("127.0.0.1", "198.51.100.7")["REMOTE_ADDR"] == "198.51.100.7"
    assert seen("::1", "2001:db8::5")["REMOTE_ADDR"] == "2001:db8::5"
    assert seen("::ffff:127.0.0.1", "198.51.100.7")["REMOTE_ADDR"] == "198.51.100.7"


def test_only_the_last_address_counts() -> None:
    # What a client wrote comes first; the address the trusted proxy saw is appended last.
    assert seen("127.0.0.1", "203.0.113.66, 198.51.100.7")["REMOTE_ADDR"] == "198.51.100.7"


@pytest.mark.parametrize("peer", ["198.51.100.7", "127.0.0.2", "10.1.2.3", "", "unix:/x"])
def test_from_any_other_peer_the_header_is_ignored(peer: str) -> None:
    assert seen(peer, "203.0.113.66")["REMOTE_ADDR"] == peer


def test_networks_may_be_trusted() -> None:
    assert seen("10.1.2.3", "198.51.100.7", ("10.0.0.0/8",))["REMOTE_ADDR"] == "198.51.100.7"


def test_without_the_header_the_peer_stands() -> None:
    assert seen("127.0.0.1", None)["REMOTE_ADDR"] == "127.0.0.1"
