"""tritonserver under a supervisor that drains it on SIGTERM.

    python -m embedded.drain [--drain-timeout S] -- tritonserver ARGS...

What Triton 2.51 does on SIGTERM by itself (measured with the embedded binary): health and
readiness fail at once (gRPC `UNAVAILABLE` "Server exiting", the HTTP port closes), every
model's scheduler stops taking requests ("Server is stopping, scheduler for model has stopped
accepting new inference requests", gRPC `UNAVAILABLE`), and it waits up to
`--exit-timeout-secs` for the requests it holds. That drains a single model, but not an
ensemble: each step of an ensemble is a new request to the step's model, so a generation that
was queued or running in `diffusion` when the signal came fails at its next step (`upscaler`,
`nsfw`) with that same "Server is stopping". Those requests are lost work on this replica.

So this supervisor starts Triton with explicit model control and, on SIGTERM or SIGINT, first
unloads every loaded ensemble. Unloading is what drains them: Triton refuses new requests to
an ensemble being unloaded (gRPC `NOT_FOUND`, "has no available versions"), turns its server
readiness false at once (strict readiness: not every model is ready), lets the requests the
ensemble holds run through all their steps (the models behind it stay loaded), and reports the
ensemble `UNAVAILABLE` in the repository index once they are done. Gateways see readiness turn
false and send their calls elsewhere; a call that still arrives is refused before any work, so
the gateway retries it on another replica. When the ensembles are gone (or `--drain-timeout`
has passed) the supervisor sends Triton the SIGTERM, and Triton stops what is left (direct
calls to a single model, such as the NSFW classifier) within its own exit timeout.

A second signal skips the wait and forwards SIGTERM at once.

Triton's APIs (docs/security.md, "Triton's APIs"): the gateway uses health, metadata,
model-config and inference, over gRPC; statistics stay open too (read-only counters, the same
the metrics port publishes to the same peers; perf_analyzer and the benchmarks read them).
shared-memory, trace and logging are closed on both protocols by a restriction whose header no
client can send (CLOSED_HEADER), so no key for them exists anywhere, not even on this command
line, which every local user can read in `ps`. model-repository, which explicit model control
makes live (load, unload: a load can run code), is closed that way on gRPC; on HTTP it takes
the key this supervisor draws at random, for the drain. That key is on tritonserver's command
line, so a drained Triton's HTTP listener must be one that only this supervisor reaches, or be
on a machine nobody else uses: in the containers it is bound to the container's own loopback
(deploy/docker/triton-entrypoint.sh); the replicas that the tests and the load run start side
by side on a developer's machine (harness/replicas.py) listen on its loopback, the one case
docs/security.md accepts. A single Triton has nothing to fail over to, so nothing to drain:
`make serve`'s and `make triton`'s (embedded/triton.py, `drain=False`) run without this
supervisor, with `undrained_command`'s flags: every model loaded at start, model-repository
closed on both protocols like the rest, and no key anywhere.

Standard library only: the Triton image runs this file with its own python3
(deploy/docker/triton-entrypoint.sh).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType
from typing import Any

# The header Triton checks on model-repository calls over HTTP (supervised_command).
KEY_HEADER = "imagegen-drain-key"
# Triton's restriction categories (`tritonserver --help`: --http-restricted-api,
# --grpc-restricted-protocol) that neither the gateway nor this supervisor uses.
CLOSED_APIS = ("shared-memory", "trace", "logging")
# A header no request can carry, so a restriction on it admits nobody. HTTP/1.1 parsers end a
# header's name at its first colon; gRPC metadata keys are lower-case [a-z0-9._-] only (Triton
# puts its "triton-grpc-protocol-" prefix in front), and gRPC's own HPACK parser refuses any
# other key. The value starts with a space, which HTTP parsers strip from every value they read.
CLOSED_HEADER, CLOSED_VALUE = "Closed:To-Everyone", " never"
# Long enough for the longest request a gateway lets Triton hold: its deadline (120 s by
# default) plus a margin. Stopping takes longer only while requests are still running.
DEFAULT_DRAIN_TIMEOUT_S = 130.0
_POLL_S = 0.25
_HTTP_TIMEOUT_S = 5.0


def log(message: str) -> None:
    print(f"drain: {message}", file=sys.stderr, flush=True)


def _option(args: Sequence[str], name: str) -> str | None:
    """The last value of `--name=value` or `--name value` in a tritonserver command line."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def http_url(command: Sequence[str]) -> str:
    """Where this machine reaches the Triton the command starts (its HTTP endpoint)."""
    address = _option(command, "--http-address") or "0.0.0.0"  # Triton's default: every interface
    if address in ("0.0.0.0", "::", "[::]"):
        address = "127.0.0.1"
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{_option(command, '--http-port') or '8000'}"


def restrictions(key: str | None) -> list[str]:
    """Triton's flags that close the APIs nobody may use, and the repository API to all but
    the drain's HTTP calls with `key`; with no key, to everyone. Triton refuses to start if the
    caller restricted one of these categories too (a category may be in one restriction only),
    so nothing given before them can reopen one."""
    closed = f"{CLOSED_HEADER}={CLOSED_VALUE}"
    everything = (*CLOSED_APIS, "model-repository")
    return [
        *(
            [f"--http-restricted-api={','.join(CLOSED_APIS)}:{closed}",
             f"--http-restricted-api=model-repository:{KEY_HEADER}={key}"]
            if key
            else [f"--http-restricted-api={','.join(everything)}:{closed}"]
        ),
        f"--grpc-restricted-protocol={','.join(everything)}:{closed}",
    ]


def supervised_command(command: Sequence[str], key: str) -> list[str]:
    """The command with what the drain needs, explicit model control (every model loaded at
    start, unless the caller chose a mode and models itself), and the restrictions."""
    extra = []
    if _option(command, "--model-control-mode") is None:
        extra += ["--model-control-mode=explicit", "--load-model=*"]
    return [*command, *extra, *restrictions(key)]


def undrained_command(command: Sequence[str]) -> list[str]:
    """The command for a Triton nobody drains (a single one, run without this supervisor):
    every model loaded at start and never again (model control `none`, unless the caller chose
    a mode), and no model-repository API on either protocol, so no key exists."""
    extra = []
    if _option(command, "--model-control-mode") is None:
        extra.append("--model-control-mode=none")
    return [*command, *extra, *restrictions(None)]


class Triton:
    """The few HTTP calls the drain makes (urllib: nothing to install in the image)."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={KEY_HEADER: self.key}
        )
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def index(self) -> dict[str, str]:
        """Model name -> state (READY, UNLOADING, UNAVAILABLE, ...)."""
        return {m["name"]: m.get("state", "") for m in self._call("POST", "/v2/repository/index", {})}

    def is_ensemble(self, model: str) -> bool:
        return self._call("GET", f"/v2/models/{model}/config").get("platform") == "ensemble"

    def unload(self, model: str) -> None:
        self._call("POST", f"/v2/repository/models/{model}/unload", {})


def drain(triton: Triton, timeout_s: float, hurry: Any) -> None:
    """Unload every ready ensemble and wait until they are gone, `timeout_s` at most or until
    `hurry()` says to stop waiting."""
    started = time.monotonic()
    try:
        ensembles = [m for m, state in triton.index().items() if state == "READY" and triton.is_ensemble(m)]
        for model in ensembles:
            triton.unload(model)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        # Not started yet, no HTTP endpoint, or model control not explicit: Triton's own stop.
        log(f"cannot unload the ensembles ({exc}); Triton stops on its own terms")
        return
    log(f"unloading {', '.join(ensembles) or 'no ensemble'}; waiting for their requests "
        f"(at most {timeout_s:g}s)")
    while ensembles and time.monotonic() - started < timeout_s and not hurry():
        try:
            states = triton.index()
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log(f"cannot read the repository index ({exc}); stopping")
            return
        if all(states.get(m) == "UNAVAILABLE" for m in ensembles):
            log(f"drained in {time.monotonic() - started:.1f}s")
            return
        time.sleep(_POLL_S)
    if ensembles:
        log(f"stopping with requests still held after {time.monotonic() - started:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
        help="longest wait for the requests Triton holds before it is stopped (seconds)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- tritonserver ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no tritonserver command given")
    key = secrets.token_urlsafe(32)
    signals: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)

    # Installed before the child starts, so no signal finds the default action (exit, leaving
    # Triton behind without a drain).
    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    child = subprocess.Popen(supervised_command(command, key))
    triton = Triton(http_url(command), key)
    while child.poll() is None:
        if signals:
            drain(triton, args.drain_timeout, hurry=lambda: len(signals) > 1)
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            break
        time.sleep(_POLL_S)
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
