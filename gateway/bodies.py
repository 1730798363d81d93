"""Reading a request's body within its limit, the same way for every endpoint that takes JSON."""

from __future__ import annotations

from flask import request

from gateway.errors import PayloadTooLarge


def read_body(limit: int) -> bytes:
    # A Content-Length over the limit is refused by Werkzeug before reading; a chunked body
    # is silently cut at the limit instead, which would surface as a confusing JSON error.
    data = request.get_data(cache=False)
    if request.content_length is None and len(data) >= limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    return data
