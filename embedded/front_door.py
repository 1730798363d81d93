"""The front door: nginx in front of the gateway's gunicorn, in every shape the project ships.

gunicorn's gthread worker gives a connection a thread as soon as bytes arrive, and the thread then
waits for the rest of the request: a few connections that send half a request stop the gateway.
nginx holds such clients in its event loop instead, reads each request whole, caps bodies and
headers, counts requests per client address, and only then hands the request to gunicorn on
loopback. docs/security.md ("The front door") has the measurements and the choices.

One configuration in every shape: deploy/nginx/nginx.conf (the main file) and
deploy/nginx/gateway.conf.template (the servers), whose `${FRONT_*}` variables are the fields of
`FrontDoorSettings` below. LocalStack (`make serve`) renders the template here; in compose and
Kubernetes the nginx image's entrypoint renders it with envsubst from the container's
environment, and tests/deploy checks that their values are these.

Four values are not the front door's to choose: the body caps of /generate and /moderate, the
Retry-After of its 429 and 503, and how long it waits for gunicorn's answer come from the
gateway's own settings (`FrontDoorSettings.derived`); a shape that sets them must set the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedded.process import ManagedProcess, ProcessStartError
from gateway.settings import fields_from_env

if TYPE_CHECKING:
    from gateway.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = PROJECT_ROOT / "deploy" / "nginx"
MAIN_CONFIG = NGINX_DIR / "nginx.conf"
TEMPLATE = NGINX_DIR / "gateway.conf.template"
PREFIX = "FRONT_"
# The image's entrypoint substitutes both spellings of a variable, as GNU envsubst does.
_VARIABLE = re.compile(r"\$(?:\{(FRONT_[A-Z0-9_]+)\}|(FRONT_[A-Z0-9_]+))")
# gunicorn's own caps on a request line and a header field (gateway/gunicorn.conf.py) sit at
# 8190: the front door's must stay below them, or a request it passed would get gunicorn's 400.
MAX_HEADER_BYTES_LIMIT = 8000
_HOST_PORT = re.compile(r"[^\s:\[\]]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5}")


class FrontDoorError(ProcessStartError):
    """nginx is missing, a FRONT_* value is wrong, or nginx did not start."""


def _setting(env: str, parse: Callable[[str], Any], doc: str, **kwargs: Any) -> Any:
    return field(metadata={"env": env, "parse": parse, "doc": doc}, **kwargs)


def _derived(env: str, doc: str, *, at_least: bool = False) -> Any:
    """A value the gateway's settings give; a shape may write it out, but only as they say (or,
    `at_least`, larger)."""
    return field(
        metadata={"env": env, "parse": int, "doc": doc, "derived": True, "at_least": at_least},
        kw_only=True,
    )


@dataclass(frozen=True)
class FrontDoorSettings:
    host: str = _setting(
        "HOST",
        str.strip,
        "Address nginx listens on, both ports (`make serve`: 127.0.0.1).",
        default="0.0.0.0",
    )
    port: int = _setting("PORT", int, "The clients' port.", default=8080)
    probe_port: int = _setting(
        "PROBE_PORT",
        int,
        "The port for probes and scrapes: `/healthz`, `/readyz` and `/metrics` only (the "
        "clients' port answers the last two with 404).",
        default=8081,
    )
    upstream: str = _setting(
        "UPSTREAM",
        str.strip,
        "gunicorn's `host:port`, on loopback (GATEWAY_HOST and GATEWAY_PORT).",
        default="127.0.0.1:8000",
    )
    probe_upstream: str = _setting(
        "PROBE_UPSTREAM",
        str.strip,
        "The gateway's own probe listener, `host:port` on loopback (GATEWAY_HOST and "
        "GATEWAY_PROBE_PORT): `/healthz`, `/readyz` and `/metrics` go there, on either port.",
        default="127.0.0.1:8001",
    )
    header_timeout_s: int = _setting(
        "HEADER_TIMEOUT_S",
        int,
        "Seconds a client has, from connecting, to send its whole request header; then the "
        "connection is closed (no answer; nginx logs 408).",
        default=10,
    )
    body_timeout_s: int = _setting(
        "BODY_TIMEOUT_S",
        int,
        "Longest pause, in seconds, while a client sends its body; then the connection is "
        "closed (no answer; nginx logs 408).",
        default=10,
    )
    max_header_bytes: int = _setting(
        "MAX_HEADER_BYTES",
        int,
        "Longest request line (else 414) and header field (else 431), in bytes; the whole "
        f"header may be four times as long (else 431). At most {MAX_HEADER_BYTES_LIMIT}.",
        default=4096,
    )
    connections_per_address: int = _setting(
        "CONNECTIONS_PER_ADDRESS",
        int,
        "Requests one client address may have at once, counted from the end of each request's "
        "header (sending a body, or waiting for the answer); the next is 429 with Retry-After.",
        default=32,
    )
    generate_max_body_bytes: int = _derived(
        "GENERATE_MAX_BODY_BYTES",
        "Largest body of `/generate` and of every path but `/moderate`, refused with 413 before "
        "it is read: GATEWAY_MAX_BODY_BYTES.",
    )
    moderate_max_body_bytes: int = _derived(
        "MODERATE_MAX_BODY_BYTES",
        "Largest body of `/moderate`: the base64 of a GATEWAY_MODERATE_MAX_BYTES image and "
        "GATEWAY_MAX_BODY_BYTES.",
    )
    retry_after_s: int = _derived(
        "RETRY_AFTER_S", "Retry-After of the front door's 429 and 503: GATEWAY_RETRY_AFTER_S."
    )
    upstream_timeout_s: int = _derived(
        "UPSTREAM_TIMEOUT_S",
        "How long nginx waits for gunicorn's answer, in seconds: the longest request the "
        "gateway may work on (GATEWAY_TRITON_DEADLINE_S, every upload attempt and backoff, "
        "5 s) and 10 s more, so that the gateway always answers first; may be set larger.",
        at_least=True,
    )

    def __post_init__(self) -> None:
        problems = [message for ok, message in self._checks() if not ok]
        if problems:
            raise FrontDoorError("invalid front door settings: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.host) and not any(c.isspace() for c in self.host),
             f"{PREFIX}HOST is empty or has a space"),
            (0 < self.port < 65536, f"{PREFIX}PORT must be in 1..65535"),
            (0 < self.probe_port < 65536, f"{PREFIX}PROBE_PORT must be in 1..65535"),
            (self.port != self.probe_port, f"{PREFIX}PORT and {PREFIX}PROBE_PORT must differ"),
            (_HOST_PORT.fullmatch(self.upstream) is not None, f"{PREFIX}UPSTREAM must be host:port"),
            (_HOST_PORT.fullmatch(self.probe_upstream) is not None,
             f"{PREFIX}PROBE_UPSTREAM must be host:port"),
            (self.upstream != self.probe_upstream,
             f"{PREFIX}UPSTREAM and {PREFIX}PROBE_UPSTREAM must differ"),
            (1 <= self.header_timeout_s <= 300, f"{PREFIX}HEADER_TIMEOUT_S must be in 1..300"),
            (1 <= self.body_timeout_s <= 300, f"{PREFIX}BODY_TIMEOUT_S must be in 1..300"),
            (1024 <= self.max_header_bytes <= MAX_HEADER_BYTES_LIMIT,
             f"{PREFIX}MAX_HEADER_BYTES must be in 1024..{MAX_HEADER_BYTES_LIMIT}"),
            (self.connections_per_address >= 1, f"{PREFIX}CONNECTIONS_PER_ADDRESS must be >= 1"),
        ]

    @staticmethod
    def derived(gateway: Settings) -> dict[str, int]:
        """The values the gateway's settings give, by field name."""
        # Imported here: the local stack has no other use for the gateway's use cases.
        from gateway.moderate import body_limit

        return {
            "generate_max_body_bytes": gateway.max_body_bytes,
            "moderate_max_body_bytes": body_limit(gateway),
            "retry_after_s": gateway.retry_after_s,
            "upstream_timeout_s": math.ceil(gateway.longest_request_s) + 10,
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str], gateway: Settings) -> FrontDoorSettings:
        """`FRONT_*` variables over the defaults, for a gateway with these settings. A derived
        variable that is set must agree with the gateway's; an unknown `FRONT_*` is an error."""
        derived = cls.derived(gateway)
        values = fields_from_env(cls, environ, PREFIX, FrontDoorError, "front door settings")
        for f in dataclasses.fields(cls):
            if f.name not in values or f.name not in derived:
                continue
            if not (
                values[f.name] >= derived[f.name]
                if f.metadata["at_least"]
                else values[f.name] == derived[f.name]
            ):
                relation = "at least " if f.metadata["at_least"] else ""
                raise FrontDoorError(
                    f"{PREFIX}{f.metadata['env']}={values[f.name]}, but the gateway's settings "
                    f"need {relation}{derived[f.name]} ({f.metadata['doc']})"
                )
        return cls(**{**derived, **values})

    def variables(self) -> dict[str, str]:
        """The template's variables, FRONT_* name to value."""
        return {
            PREFIX + f.metadata["env"]: str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }


def template_variables(text: str) -> set[str]:
    """The FRONT_* variables a template uses."""
    return {braced or bare for braced, bare in _VARIABLE.findall(text)}


def render(text: str, variables: Mapping[str, str]) -> str:
    """The template with its FRONT_* variables replaced, as the image's envsubst does; a
    variable without a value is an error here (envsubst would leave it for nginx to fail on)."""
    missing = sorted(template_variables(text) - set(variables))
    if missing:
        raise FrontDoorError(f"no value for {', '.join(missing)} in the front door's template")
    return _VARIABLE.sub(lambda m: variables[m.group(1) or m.group(2)], text)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every FRONT_* setting, for the docs."""
    rows = []
    for f in dataclasses.fields(FrontDoorSettings):
        derived = f.metadata.get("derived", False)
        default = "(from the gateway)" if derived else str(f.default)
        rows.append((PREFIX + f.metadata["env"], default, f.metadata["doc"]))
    return rows


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FrontDoorError(
            "nginx is not installed: `make serve` installs Debian's nginx-light when run as "
            "root; otherwise install it (`sudo apt-get install nginx-light`, or any nginx >= "
            "1.18 on PATH; docs/getting-started.md)"
        )
    return found


class FrontDoor(ManagedProcess):
    """nginx with the front door's configuration, unprivileged, everything under `prefix`."""

    name = "the front door (nginx)"
    start_error = FrontDoorError
    # SIGQUIT is nginx's graceful stop: no new connections, requests in flight finish.
    stop_signal = signal.SIGQUIT

    def __init__(self, settings: FrontDoorSettings, prefix: Path, log_path: Path | None = None) -> None:
        self.settings = settings
        self.prefix = prefix
        self.log_path = log_path
        self.process = None

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.settings.port}"

    @property
    def probe_url(self) -> str:
        return f"http://{self._host}:{self.settings.probe_port}"

    @property
    def _host(self) -> str:
        host = self.settings.host
        return f"[{host}]" if ":" in host else host

    @property
    def ready_url(self) -> str:
        return f"{self.probe_url}/healthz"

    def write_config(self) -> Path:
        """The main file and the rendered servers under the prefix; returns the main file."""
        (self.prefix / "conf.d").mkdir(parents=True, exist_ok=True)
        main = self.prefix / "nginx.conf"
        shutil.copyfile(MAIN_CONFIG, main)
        rendered = render(TEMPLATE.read_text(), self.settings.variables())
        (self.prefix / "conf.d" / "gateway.conf").write_text(rendered)
        return main

    def command(self, *extra: str) -> list[str]:
        main = self.write_config()
        # `daemon off` on the command line, as the nginx image's CMD gives it.
        directives = "daemon off;"
        if os.geteuid() == 0:
            # Under root nginx would run its workers as nobody, who cannot reach a private run
            # folder (pytest's are 0700): they stay the user who started the stack, like gunicorn.
            directives += " user root;"
        return [nginx_binary(), *extra, "-p", f"{self.prefix}/", "-c", str(main), "-g", directives]

    def check_config(self) -> None:
        """`nginx -t` on the configuration these settings render; raises with nginx's words."""
        checked = subprocess.run(
            self.command("-t", "-q"), capture_output=True, text=True, timeout=60, check=False
        )
        if checked.returncode != 0:
            raise FrontDoorError(f"nginx refuses the configuration: {checked.stderr.strip()}")
