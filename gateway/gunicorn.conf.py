# ruff: noqa: N999  (gunicorn looks for this file name)
"""gunicorn settings: `gunicorn -c gateway/gunicorn.conf.py 'gateway:create_app()'`.

Bind, workers and threads come from the same `GATEWAY_*` settings as the app, so a bad value
stops the master before any worker starts.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import tempfile
from typing import Any

from gateway.logs import logging_config
from gateway.settings import Settings, SettingsError

try:
    _settings = Settings.from_env(os.environ)
except SettingsError as exc:
    raise SystemExit(f"gateway: {exc}") from None
for _problem in (_settings.threads_problem(), _settings.anonymous_problem()):
    if _problem is not None:
        raise SystemExit(f"gateway: {_problem}")

_host = f"[{_settings.host}]" if ":" in _settings.host else _settings.host
bind = [f"{_host}:{_settings.port}"]
# Threads, not processes, carry the concurrency: a request mostly waits on Triton or storage.
worker_class = "gthread"
workers = _settings.workers
threads = _settings.threads
# gthread workers heartbeat from their main loop, so a long generation does not trip this.
timeout = 60
# On SIGTERM a worker stops accepting and lets requests in flight finish, upload included:
# by default as long as the longest request can take (Triton deadline + every upload attempt).
graceful_timeout = math.ceil(_settings.graceful_timeout_s)  # gunicorn takes whole seconds
keepalive = 5
# The front door (deploy/nginx) connects from loopback and writes X-Forwarded-For itself; only
# such peers may set forwarded headers (the app reads the client's address the same way).
forwarded_allow_ips = ",".join(_settings.trusted_proxies)
# The front door caps request lines and header fields (FRONT_MAX_HEADER_BYTES, at most 8000)
# and answers 414 or 431 in JSON; gunicorn's own caps sit above its, at gunicorn's maximums, so
# that a request nginx passed is never refused here with an HTML 400.
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 32768
loglevel = _settings.log_level.lower()
# JSON lines on stdout for gunicorn and the app alike (gateway/logs.py). The access line takes
# its fields from gunicorn's atoms: the path without its query string, never the headers.
logconfig_dict = logging_config(_settings.log_level)
accesslog = "-"
access_log_format = "%(m)s %(U)s %(s)s"

if _settings.workers > 1:
    # Each worker counts for itself; prometheus_client's multi-process mode sums the workers'
    # files at scrape time. Its directory must be known before the workers import the client.
    _metrics_dir = _settings.metrics_dir or tempfile.mkdtemp(prefix="gateway-metrics-")
    os.makedirs(_metrics_dir, exist_ok=True)
    for _name in os.listdir(_metrics_dir):  # counters left over from an earlier run
        if _name.endswith(".db"):
            os.unlink(os.path.join(_metrics_dir, _name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    os.environ["GATEWAY_METRICS_DIR"] = _metrics_dir

    def child_exit(server: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    def on_exit(server: Any) -> None:
        if not _settings.metrics_dir:
            shutil.rmtree(_metrics_dir, ignore_errors=True)


def post_worker_init(worker: Any) -> None:
    # Probes and scrapes on threads of their own (gateway/probes.py), once the app is built.
    if _settings.probe_port is not None:
        from gateway.probes import serve_probes

        serve_probes(worker.wsgi, _settings.host, _settings.probe_port)


# gunicorn >= 24 opens a control socket at one fixed per-user path; a second gateway on the same
# machine (tests beside `make serve`) would fight over it, and nothing here uses it.
control_socket_disable = True


# A /moderate request decodes an image of up to tens of MB, freed when it ends. glibc keeps a
# freed block that size in the arena of the thread that freed it once its dynamic mmap threshold
# has grown past it, so a worker whose threads took turns at /moderate, one at a time, held
# 300 MB it no longer used (measured with RGBA images). A fixed threshold hands every block over
# 1 MiB back to the system the moment it is freed.
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1024 * 1024


def post_fork(server: Any, worker: Any) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own allocator, its own policy
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
