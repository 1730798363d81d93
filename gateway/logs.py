"""Structured logs: one JSON object a line, each with the request id, and no secrets.

The request id comes from the client's `X-Request-ID` when it is a plain token, else a new one;
it is returned on every response and stamped on every log line of the request, gunicorn's access
line included. Presigned query strings (the signatures) and API keys never reach a log: the code
logs redacted URLs only, and the formatter scrubs URL queries, signature parameters and bearer
tokens from every line as a second line of defence.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SECRETS = [
    (re.compile(r"(https?://[^\s?#\"'<>]*)\?[^\s\"'<>]*", re.IGNORECASE), r"\1?[redacted]"),
    (
        re.compile(
            r"((?:signature|x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid"
            r"|api_key|apikey|access_token)=)[^&\s\"'<>]+",
            re.IGNORECASE,
        ),
        r"\1[redacted]",
    ),
    (re.compile(r"(bearer\s+)[^\s\"',]+", re.IGNORECASE), r"\1[redacted]"),
    # gunicorn's error log quotes a header line it could not parse whole: without a colon,
    # nothing tells its name from its value (`Authorization<TAB><key>`), so none of it stays.
    (re.compile(r"(invalid http header(?: name)?: ).+", re.IGNORECASE), r"\1[redacted]"),
]
# Characters JSON leaves as they are but line-oriented readers split on (Python's splitlines,
# JavaScript): escaped, one record stays one line whatever a prompt holds.
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Where a request's tenant name waits for gunicorn's access line (its `{...}e` atoms are the
# WSGI environ's entries): the name from the tenants file, never the key.
TENANT_ENVIRON = "gateway.tenant"
# gunicorn's access-log atoms worth a field each. Never the whole atom dict: it holds every
# request header, Authorization included.
_ACCESS_ATOMS = {
    "m": "method",
    "U": "path",
    "s": "status",
    "B": "bytes",
    "M": "duration_ms",
    "h": "remote",
    "{x-request-id}o": "request_id",
    f"{{{TENANT_ENVIRON}}}e": "tenant",
}


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit} chars)"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        atoms = record.args if isinstance(record.args, dict) else None
        if record.name == "gunicorn.access" and atoms is not None:
            entry["message"] = "request"
            for atom, name in _ACCESS_ATOMS.items():
                value = atoms.get(atom)
                if value not in (None, "-"):
                    entry[name] = int(value) if name == "status" and str(value).isdigit() else value
        else:
            entry["message"] = record.getMessage()
            current = request_id.get()
            if current is not None:
                entry["request_id"] = current
            for key, value in vars(record).items():
                if key not in _STANDARD and not key.startswith("_"):
                    entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Redacted value by value, before encoding: a pattern must never cut a JSON escape.
        clean = {k: redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        text = json.dumps(clean, default=lambda v: redact(str(v)), ensure_ascii=False)
        return text.translate(_LINE_BREAKERS)


def logging_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` that sends gunicorn's and the gateway's logs as JSON."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
    loggers = ("gateway", "gunicorn.error", "gunicorn.access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "root": {"level": "WARNING", "handlers": ["json"]},
        "loggers": {
            name: {
                "level": "INFO" if name == "gunicorn.access" else level,
                "handlers": ["json"],
                "propagate": False,
            }
            for name in loggers
        },
    }


def track_request_ids(app: Flask) -> None:
    @app.before_request
    def _assign() -> None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        rid = offered if _VALID_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        g.request_id = rid
        g.request_id_token = request_id.set(rid)

    @app.after_request
    def _return(response: Response) -> Response:
        rid = g.get("request_id")
        if rid is not None:
            response.headers[REQUEST_ID_HEADER] = rid
        return response

    @app.teardown_request
    def _forget(_error: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            request_id.reset(token)
