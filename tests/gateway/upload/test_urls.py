from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.upload.urls import check_upload_url, host_allowed, parse_upload_url, rewrite_url

HASH = "d41d8cd98f00b204e9800998ecf8427e"
SPEC_QUERY = "?AWSAccessKeyId=AKIAQE43KJDN7ARTLAVM&Signature=%2ByiRa6eTIiuPtE3wGWzFzmS3snA%3D&Expires=1756921542"
SPEC_URL = "https://prod-data.sekai.chat/aiu-character/000/1.png" + SPEC_QUERY


def test_the_specs_example_is_rewritten_exactly_as_the_spec_shows() -> None:
    target = rewrite_url(parse_upload_url(SPEC_URL), HASH, "rewrite")
    assert target.url == (
        "https://prod-data.sekai.chat/aiu-character/000/d41d8cd98f00b204e9800998ecf8427e.jpg"
        "?AWSAccessKeyId=AKIAQE43KJDN7ARTLAVM&Signature=%2ByiRa6eTIiuPtE3wGWzFzmS3snA%3D"
        "&Expires=1756921542"
    )
    assert target.request_target == f"/aiu-character/000/{HASH}.jpg" + SPEC_QUERY


def test_a_sigv4_query_is_kept_byte_for_byte(s3) -> None:  # type: ignore[no-untyped-def]
    url = s3.presign_put("aiu-character/000/1.png")
    assert "X-Amz-Signature=" in url and "%2F" in url  # a real boto3 SigV4 URL
    prefix, query = url.split("?", 1)
    target = rewrite_url(parse_upload_url(url), HASH, "rewrite")
    assert target.url == prefix.rsplit("/", 1)[0] + f"/{HASH}.jpg?" + query


@pytest.mark.parametrize(
    "url",
    [
        # lower-case escapes, odd order, repeated and empty parameters, '+' and '=' raw
        "http://h.test/a/1.png?b=%2b%3d&a=1&a=2&empty=&flag&x=a+b=c",
        "http://h.test:8443/a%20b/c/placeholder?Signature=abc%2F%2B",
        "https://H.Test/1.png?q",
        "http://h.test/deep/er/path/2.jpg#frag",
    ],
)
def test_everything_but_the_file_name_is_kept(url: str) -> None:
    target = rewrite_url(parse_upload_url(url), HASH, "rewrite")
    old_name = parse_upload_url(url).filename
    assert target.url == url.replace(f"/{old_name}", f"/{HASH}.jpg", 1)
    assert "#" not in target.request_target


def test_keep_naming_uses_the_url_as_given() -> None:
    target = rewrite_url(parse_upload_url(SPEC_URL), HASH, "keep")
    assert target.url == SPEC_URL


def test_redacted_form_drops_the_query() -> None:
    assert parse_upload_url(SPEC_URL).redacted == "https://prod-data.sekai.chat/aiu-character/000/1.png"


@pytest.mark.parametrize(
    "url",
    [
        "https://prod-data.sekai.chat/aiu-character/000/",  # no file name
        "https://prod-data.sekai.chat",
        "https://prod-data.sekai.chat?x=1",
        "https://prod-data.sekai.chat/a/..?x",
        "ftp://prod-data.sekai.chat/a/1.png",
        "file:///etc/passwd",
        "//prod-data.sekai.chat/a/1.png",
        "/a/1.png",
        "prod-data.sekai.chat/a/1.png",
        "https://user:pw@prod-data.sekai.chat/a/1.png",
        "https://prod-data.sekai.chat/a b/1.png",
        "https://prod-data.sekai.chat/a/1.png?x=é",
        "https://prod-data.sekai.chat/a/1.png\r\nX-Injected: 1",
        "https:///a/1.png",
        "https://prod-data.sekai.chat:99999/a/1.png",
        "",
    ],
)
def test_bad_urls_are_400_naming_s3_prefix(url: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_upload_url(url)
    assert err.value.field == "s3_prefix"


@pytest.mark.parametrize(
    ("url", "allowed", "expected"),
    [
        ("http://127.0.0.1:9000/1.png", ("http://127.0.0.1:9000",), "exact"),
        ("https://127.0.0.1:9000/1.png", ("http://127.0.0.1:9000",), "exact"),  # http allows https
        ("http://127.0.0.1:9000/1.png", ("127.0.0.1:9000",), None),  # plain http not allowed
        ("http://127.0.0.1:9000/1.png", ("https://127.0.0.1:9000",), None),
        ("http://127.0.0.1:9001/1.png", ("http://127.0.0.1:9000",), None),
        ("http://127.0.0.1:9000/1.png", ("http://localhost:9000",), None),
        ("https://prod-data.sekai.chat/1.png", ("prod-data.sekai.chat",), "exact"),
        ("http://prod-data.sekai.chat/1.png", ("prod-data.sekai.chat",), None),
        ("https://prod-data.sekai.chat:8443/1.png", ("prod-data.sekai.chat",), None),  # 80/443 only
        ("https://prod-data.sekai.chat/1.png", ("other.sekai.chat",), None),
        ("https://a.sekai.chat/1.png", ("*.sekai.chat",), "wildcard"),
        ("https://evil-sekai.chat/1.png", ("*.sekai.chat",), None),  # look-alike suffix
        ("https://sekai.chat.evil.test/1.png", ("*.sekai.chat",), None),
        ("https://sekai.chat/1.png", ("*.sekai.chat",), None),
        ("https://a.sekai.chat/1.png", ("*.sekai.chat", "a.sekai.chat"), "exact"),  # exact wins
        ("https://10.0.0.8/1.png", ("*.0.0.8",), None),  # suffixes match names, not addresses
        # A wildcard matches loopback names too; gateway.upload.egress then refuses their addresses.
        ("https://localhost/1.png", ("*",), "wildcard"),
        ("http://localhost/1.png", ("*",), None),
        ("http://localhost:8000/1.png", ("http://*:8000",), "wildcard"),
        ("http://[::1]:9000/1.png", ("http://[::1]:9000",), "exact"),
        ("https://anything.test/1.png", (), None),  # empty allowlist: nothing
    ],
)
def test_allowlist(url: str, allowed: tuple[str, ...], expected: str | None) -> None:
    target = parse_upload_url(url)
    assert host_allowed(target.scheme, target.host, target.port, allowed) == expected


def test_check_upload_url_refuses_a_host_not_allowed() -> None:
    with pytest.raises(InvalidRequest) as err:
        check_upload_url(SPEC_URL, ("127.0.0.1:9000",))
    assert err.value.field == "s3_prefix"
    assert "GATEWAY_UPLOAD_ALLOWED_HOSTS" in err.value.message
    assert "Signature" not in err.value.message


def test_host_matching_ignores_case_and_a_trailing_dot() -> None:
    assert check_upload_url("https://Prod-Data.Sekai.Chat./a/1.png", ("prod-data.sekai.chat",))


def test_plain_http_to_an_https_only_host_says_https_is_required() -> None:
    with pytest.raises(InvalidRequest) as err:
        check_upload_url("http://prod-data.sekai.chat/a/1.png", ("prod-data.sekai.chat",))
    assert err.value.field == "s3_prefix" and "https" in err.value.message


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "017700000001", "127.0.0.01", "0"]
)
def test_numeric_hosts_other_than_dotted_decimal_are_refused(host: str) -> None:
    """inet_aton reads all of these as 127.0.0.1 (or 0.0.0.0): they never reach a resolver."""
    with pytest.raises(InvalidRequest) as err:
        parse_upload_url(f"http://{host}:9000/a/1.png")
    assert err.value.field == "s3_prefix"


def test_the_host_header_is_what_an_http_client_derives_from_the_url() -> None:
    assert parse_upload_url(SPEC_URL).host_header == "prod-data.sekai.chat"
    assert parse_upload_url("http://Storage.Test:9000/1.png").host_header == "storage.test:9000"
    assert parse_upload_url("https://[::1]:8443/1.png").host_header == "[::1]:8443"
    assert parse_upload_url("http://h.test:80/1.png").host_header == "h.test"
