"""Upload URLs: the shape check, the host allowlist and the `{image_hash}.jpg` rewrite (the
shape check and the allowlist serve jobs' webhook URLs too, without the file name).

Everything works on the URL *string*: the presigned query string is sliced out and put back
unchanged, never parsed and re-encoded, because a signature covers its exact bytes
(`%2B` must stay `%2B`, parameter order must stay as it is). Nothing here touches the network:
the host's addresses are resolved and checked once, later, by `gateway.upload.egress`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from typing_extensions import Self

from gateway.errors import InvalidRequest
from gateway.settings import NamingPolicy

_DEFAULT_PORTS = {"http": 80, "https": 443}
U = TypeVar("U", bound="UploadUrl")
# RFC 3986 characters only: anything else would be re-encoded (or refused) by some HTTP layer,
# and the query string must reach the storage exactly as the client sent it.
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_SPLIT = re.compile(r"(?P<scheme>[^:/?#]+)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)", re.DOTALL)
_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")
# A host whose last label is a number is an IPv4 address to resolvers, in any of the forms
# inet_aton accepts (2130706433, 0x7f000001, 0177.0.0.1, 127.1): only dotted decimal is allowed.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


@dataclass(frozen=True)
class UploadUrl:
    """A parsed http(s) URL, kept as the exact pieces of the string the client sent.

    Three stages, each a subtype of the one before, so a function says which it needs:
    `UploadUrl` (the shape is right), `AllowedUrl` (the allowlist lets it through) and
    `gateway.upload.egress.PinnedUrl` (its host resolved once, every address checked), the only
    kind the uploader takes.
    """

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
    def host_header(self) -> str:
        """The Host header: what an HTTP client derives from the URL, as the signer saw it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme.lower()] else f"{host}:{self.port}"

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def redacted(self) -> str:
        """The URL without its query string: safe for logs (the query holds the signature)."""
        return f"{self.scheme}://{self.authority}{self.path}"

    def with_filename(self, filename: str) -> Self:
        """The same URL (and stage) with another last path segment."""
        directory = self.path.rsplit("/", 1)[0]
        return replace(self, path=f"{directory}/{filename}")


@dataclass(frozen=True)
class AllowedUrl(UploadUrl):
    """An `UploadUrl` that its allowlist (`GATEWAY_UPLOAD_ALLOWED_HOSTS`, or
    `GATEWAY_WEBHOOK_ALLOWED_HOSTS` for a webhook) lets through."""

    # The allowlist names this host's address exactly, as an IP literal: the operator's explicit
    # escape hatch to loopback or private storage. A host *name* listed exactly is not one: what
    # it resolves to is not the operator's to vouch for, so it gets the wildcards' checks.
    exact: bool


def parse_upload_url(url: str, *, field: str = "s3_prefix", file_name: bool = True) -> UploadUrl:
    """Check that `url` is an absolute http(s) URL with a file name; 400 naming `field` if not.
    Without `file_name` any path will do, and an empty one is `/`."""

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
    path = parts["path"] or ("" if file_name else "/")
    name = path.rsplit("/", 1)[1] if "/" in path else ""
    if file_name and name in ("", ".", ".."):
        raise bad("must end in a file name (e.g. .../1.png?...) that the gateway can replace")
    host = hostport["host"].lower().rstrip(".").strip("[]")
    last_label = host.rsplit(".", 1)[-1]
    if ":" not in host and _NUMERIC_LABEL.fullmatch(last_label) and not _is_dotted_ipv4(host):
        raise bad("has a numeric host that is not a dotted-decimal IPv4 address")
    return UploadUrl(scheme, authority, path, parts["rest"], host, port)


def check_upload_url(
    url: str,
    allowed_hosts: Iterable[str],
    *,
    field: str = "s3_prefix",
    file_name: bool = True,
    setting: str = "GATEWAY_UPLOAD_ALLOWED_HOSTS",
) -> AllowedUrl:
    """Parse `url` and refuse it unless the allowlist lets this scheme reach this host and port;
    `setting` is where that allowlist comes from, named in the refusal.

    No connection and no DNS lookup happen here; `gateway.upload.egress` resolves the host once and
    checks its addresses before anything is sent.
    """
    target = parse_upload_url(url, field=field, file_name=file_name)
    permit = host_allowed(target.scheme.lower(), target.host, target.port, tuple(allowed_hosts))
    if permit is None:
        plain_http = target.scheme.lower() == "http"
        if plain_http and host_allowed("https", target.host, target.port, tuple(allowed_hosts)):
            reason = "must be https: this host is not allowed over plain http"
        else:
            reason = f"points to a host the gateway may not send to ({target.host}:{target.port})"
        raise InvalidRequest(f"{field} {reason}; see {setting}", field=field)
    return AllowedUrl(**vars(target), exact=permit == "exact" and not _is_hostname(target.host))


def host_allowed(
    scheme: str, host: str, port: int, allowed: tuple[str, ...]
) -> Literal["exact", "wildcard"] | None:
    """Which kind of entry lets `scheme://host:port` through: "exact", "wildcard" or None.

    Entries are `[http://]host[:port]`, `[http://]*.suffix[:port]` or `[http://]*[:port]`.
    https is always required unless the entry starts with `http://`. Without a port an entry
    allows the scheme's default ports (80, 443) only, so naming a host never opens its other
    services. Only an exact entry that is an IP literal may later reach loopback or private
    addresses.
    """
    found: Literal["wildcard"] | None = None
    for entry in allowed:
        entry_scheme, _, rest = entry.rpartition("://")
        if scheme != "https" and entry_scheme != "http":
            continue
        pattern, _, entry_port = rest.rpartition(":") if _has_port(rest) else (rest, "", "")
        if entry_port:
            if int(entry_port) != port:
                continue
        elif port not in _DEFAULT_PORTS.values():
            continue
        pattern = pattern.strip("[]")
        if pattern == host:
            return "exact"
        if pattern == "*" or (
            pattern.startswith("*.") and host.endswith(pattern[1:]) and _is_hostname(host)
        ):
            found = "wildcard"
    return found


def rewrite_url(target: U, image_hash: str, naming: NamingPolicy) -> U:
    """`rewrite` (the spec): the last path segment becomes `{image_hash}.jpg`; `keep`: as sent."""
    if naming == NamingPolicy.KEEP:
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


def _is_dotted_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)  # four decimal octets, no leading zeros
    except ValueError:
        return False
    return True
