"""Upload URLs: the shape check, the host allowlist and the `{image_hash}.jpg` rewrite.

Everything works on the URL *string*: the presigned query string is sliced out and put back
unchanged, never parsed and re-encoded, because a signature covers its exact bytes
(`%2B` must stay `%2B`, parameter order must stay as it is).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InvalidRequest

_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 characters only: anything else would be re-encoded (or refused) by some HTTP layer,
# and the query string must reach the storage exactly as the client sent it.
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_SPLIT = re.compile(r"(?P<scheme>[^:/?#]+)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")


@dataclass(frozen=True)
class UploadUrl:
    """A validated http(s) URL, kept as the exact pieces of the string the client sent."""

    scheme: str
    authority: str
    path: str
    rest: str  # "?query" and/or "#fragment", verbatim
    host: str  # lower case, IPv6 without brackets
    port: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}{self.rest}"

    @property
    def request_target(self) -> str:
        """Path and query as they go on the request line; a fragment is never sent."""
        return self.path + self.rest.split("#", 1)[0]

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def redacted(self) -> str:
        """The URL without its query string: safe for logs (the query holds the signature)."""
        return f"{self.scheme}://{self.authority}{self.path}"

    def with_filename(self, filename: str) -> UploadUrl:
        directory = self.path.rsplit("/", 1)[0]
        return UploadUrl(
            self.scheme, self.authority, f"{directory}/{filename}", self.rest, self.host, self.port
        )


def parse_upload_url(url: str, *, field: str = "s3_prefix") -> UploadUrl:
    """Check that `url` is an absolute http(s) URL with a file name; 400 naming `field` if not."""

    def bad(reason: str) -> InvalidRequest:
        return InvalidRequest(f"{field} {reason}", field=field)

    if not _URI_CHARS.fullmatch(url):
        raise bad("must be a URL made of URL characters only (no spaces, no raw non-ASCII)")
    parts = _SPLIT.fullmatch(url)
    if parts is None:
        raise bad("must be an absolute http(s) URL")
    scheme = parts["scheme"]
    if scheme.lower() not in _DEFAULT_PORTS:
        raise bad("must be an http or https URL")
    authority = parts["authority"]
    if "@" in authority:
        raise bad("must not contain user credentials")
    hostport = _AUTHORITY.fullmatch(authority)
    if hostport is None or not hostport["host"].strip("."):
        raise bad("has no valid host")
    port = int(hostport["port"]) if hostport["port"] else _DEFAULT_PORTS[scheme.lower()]
    if not 0 < port < 65536:
        raise bad("has an invalid port")
    path = parts["path"]
    name = path.rsplit("/", 1)[1] if "/" in path else ""
    if name in ("", ".", ".."):
        raise bad("must end in a file name (e.g. .../1.png?...) that the gateway can replace")
    host = hostport["host"].lower().rstrip(".").strip("[]")
    return UploadUrl(scheme, authority, path, parts["rest"], host, port)


def check_upload_url(
    url: str, allowed_hosts: Iterable[str], *, field: str = "s3_prefix"
) -> UploadUrl:
    """Parse `url` and refuse it unless its host is allowed; no connection is ever made here."""
    target = parse_upload_url(url, field=field)
    if not host_allowed(target.host, target.port, tuple(allowed_hosts)):
        raise InvalidRequest(
            f"{field} points to a host the gateway may not upload to ({target.host}:{target.port});"
            " see GATEWAY_UPLOAD_ALLOWED_HOSTS",
            field=field,
        )
    return target


def host_allowed(host: str, port: int, allowed: tuple[str, ...]) -> bool:
    """Exact entries allow any address (the operator named it); wildcards public addresses only.

    Entries are `host[:port]`, `*.suffix[:port]` or `*[:port]`; without a port an entry allows
    the scheme's default ports (80, 443) only, so naming a host never opens its other services.
    """
    for entry in allowed:
        pattern, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
        if entry_port:
            if int(entry_port) != port:
                continue
        elif port not in _DEFAULT_PORTS.values():
            continue
        pattern = pattern.strip("[]")
        if pattern == host:
            return True
        wildcard = pattern == "*" or (
            pattern.startswith("*.") and host.endswith(pattern[1:]) and _is_hostname(host)
        )
        if wildcard and _resolves_to_public(host, port):
            return True
    return False


def rewrite_url(target: UploadUrl, image_hash: str, naming: str) -> UploadUrl:
    """`rewrite` (the spec): the last path segment becomes `{image_hash}.jpg`; `keep`: as sent."""
    if naming == "keep":
        return target
    return target.with_filename(f"{image_hash}.jpg")


def _has_port(entry: str) -> bool:
    # Settings only accept IPv6 in brackets, so a trailing ":digits" is always a port.
    return re.search(r":[0-9]+$", entry) is not None


def _is_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _resolves_to_public(host: str, port: int) -> bool:
    # Checked at validation time only; a name that later resolves elsewhere (DNS rebinding) is
    # not caught here, which is why private targets need an exact allowlist entry.
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return False
    try:
        return bool(addresses) and all(
            ipaddress.ip_address(a.split("%", 1)[0]).is_global for a in addresses
        )
    except ValueError:
        return False
