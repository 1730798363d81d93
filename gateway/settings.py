"""Gateway settings: read once from `GATEWAY_*` environment variables into a frozen dataclass.

Nothing else in the package reads the environment; the app factory receives a `Settings` value,
so tests build one directly and a bad value fails the process at start, not on the first request.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# The model names only: the contract imports no gRPC at module level (gunicorn's master reads
# the settings before forking its workers).
from gateway.nvidia.api import INLINE_LIMIT_CHARS, INLINE_MAX_BYTES
from gateway.triton.contract import Model, Priority
from gateway.triton.target import parse_target

PREFIX = "GATEWAY_"
# Threads each gunicorn worker keeps beyond MAX_IN_FLIGHT, the bound on the requests that hold
# one for long: while generations hold theirs, every quick answer (the 429 past the bound, a 401,
# /openapi.json) still gets one. With the front door reading whole requests nothing else holds a
# thread longer than its own work; probes have threads of their own (PROBE_PORT).
SPARE_THREADS = 2

class NamingPolicy(str, enum.Enum):
    """What the uploaded object is called: the spec's `{image_hash}.jpg`, or the URL as given."""

    REWRITE = "rewrite"
    KEEP = "keep"

T = TypeVar("T")


class SettingsError(ValueError):
    """A `GATEWAY_*` variable has a value the gateway cannot run with."""


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _parse_hosts(raw: str) -> tuple[str, ...]:
    entries = tuple(e.strip().lower() for e in raw.split(",") if e.strip())
    for entry in entries:
        host = r"(\*|\*\.[a-z0-9.-]+|[a-z0-9.-]+|\[[0-9a-f:.]+\])"
        if not re.fullmatch(rf"(https?://)?{host}(:[0-9]{{1,5}})?", entry):
            raise ValueError(f"{entry!r} is not [http://]host[:port], *.suffix[:port] or *")
    return entries


def _parse_backoff(raw: str) -> tuple[float, ...]:
    if not raw.strip():
        return ()  # no retries at all: one attempt
    delays = tuple(float(part) for part in raw.split(","))
    if any(not (0 <= d <= 300) for d in delays):
        raise ValueError("each delay must be between 0 and 300 seconds")
    return delays


def _parse_headers(raw: str) -> tuple[tuple[str, str], ...]:
    # "Name: value; Name2: value2": semicolons, because header values may contain commas.
    headers: list[tuple[str, str]] = []
    for item in raw.split(";"):
        if not item.strip():
            continue
        name, sep, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ValueError(f"{item.strip()!r} is not 'Name: value'")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError(f"header {name} has a control character in its value")
        if name.lower() in {"host", "content-length", "transfer-encoding"}:
            raise ValueError(f"header {name} is set by the gateway itself")
        headers.append((name, value))
    return tuple(headers)


def _parse_naming(raw: str) -> NamingPolicy:
    try:
        return NamingPolicy(raw.strip().lower())
    except ValueError:
        raise ValueError("expected rewrite or keep") from None


def _parse_networks(raw: str) -> tuple[str, ...]:
    entries = tuple(e.strip() for e in raw.split(",") if e.strip())
    for entry in entries:
        ipaddress.ip_network(entry, strict=False)  # the ValueError names the entry
    return entries


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _parse_http_url(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^\s]*)?", value):
        raise ValueError("expected an http(s) URL")
    return value


def _parse_secret(raw: str) -> str | None:
    # It goes into an Authorization header: only printable ASCII without spaces fits there.
    value = raw.strip()
    if not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("has a space, a control or a non-ASCII character")
    return value or None


def _parse_triton_url(raw: str) -> str:
    parse_target(raw)  # the ValueError says what is wrong
    return raw.strip()


def _parse_optional_int(raw: str) -> int | None:
    return int(raw) if raw.strip() else None


def _parse_optional_float(raw: str) -> float | None:
    return float(raw) if raw.strip() else None


def _parse_schedule(raw: str) -> tuple[float, ...]:
    # Webhook retries may wait hours (a receiver down for a deploy); uploads' stay under 300 s.
    if not raw.strip():
        return ()
    delays = tuple(float(part) for part in raw.split(","))
    if any(not (0 <= d <= 86400) for d in delays):
        raise ValueError("each delay must be between 0 and 86400 seconds")
    return delays


def _parse_redis_url(raw: str) -> str | None:
    value = raw.strip()
    if value and not re.fullmatch(r"(rediss?|unix)://\S+", value):
        raise ValueError("expected redis://host:port/db, rediss://... or unix:///path")
    return value or None


def parse_webhook_secrets(raw: str) -> tuple[str, ...]:
    """Comma list of Standard Webhooks secrets, `whsec_` + base64 (the first signs, every one
    is sent as a signature: receivers may hold either while secrets rotate)."""
    secrets = tuple(part.strip() for part in raw.split(",") if part.strip())
    for secret in secrets:
        body = secret.removeprefix("whsec_")
        if body == secret or not re.fullmatch(r"[A-Za-z0-9+/]{16,}={0,2}", body):
            raise ValueError("each secret must be whsec_ followed by base64 (at least 16 chars)")
        try:
            decoded = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise ValueError("a secret's part after whsec_ is not valid base64") from None
        if len(decoded) < 16:
            raise ValueError("each secret must hold at least 16 bytes (128 bits)")
    return secrets


def parse_priority(raw: str) -> Priority:
    """`interactive` or `batch`: a Triton priority level by its name (tenants file, settings)."""
    try:
        return Priority[raw.strip().upper()]
    except KeyError:
        raise ValueError(f"expected {' or '.join(p.name.lower() for p in Priority)}") from None


def parse_api_keys(raw: str) -> tuple[str, ...]:
    """Comma- or line-separated keys (a key file may have `#` comment lines)."""
    keys = tuple(
        key.strip()
        for line in raw.splitlines()
        if not line.lstrip().startswith("#")
        for key in line.split(",")
        if key.strip()
    )
    for key in keys:
        # The characters of an RFC 6750 bearer token; long enough not to be guessed.
        if len(key) < 16 or not re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", key):
            raise ValueError(
                "each key must be at least 16 characters of A-Z a-z 0-9 - . _ ~ + / ="
            )
    return keys


def _setting(
    env: str, parse: Callable[[str], Any], doc: str, *, secret: bool = False, **kwargs: Any
) -> Any:
    """A dataclass field that knows its environment variable, parser and docs line.

    A secret is left out of the repr and never echoed in a settings error.
    """
    return field(
        metadata={"env": env, "parse": parse, "doc": doc, "secret": secret},
        repr=not secret,
        **kwargs,
    )


@dataclass(frozen=True)
class Settings:
    triton_url: str = _setting(
        "TRITON_URL",
        _parse_triton_url,
        "Triton's gRPC target: `host:port`, `dns:///name:port` (every address of the name is a "
        "replica, found again every TRITON_REFRESH_S), `dns://server:port/name:port` (asking "
        "that DNS server), `ipv4:a:port,b:port` (fixed replicas). See "
        "[Several Triton replicas](scaling.md#several-triton-replicas-behind-the-gateways).",
        default="127.0.0.1:8001",
    )
    triton_metrics_url: str = _setting(
        "TRITON_METRICS_URL",
        str.strip,
        "Triton metrics endpoint; `/readyz` reads which models (demo or real) are loaded from it.",
        default="http://127.0.0.1:8002/metrics",
    )
    triton_deadline_s: float = _setting(
        "TRITON_DEADLINE_S",
        float,
        "Deadline for the one Triton call per request (seconds); past it the answer is 504.",
        default=120.0,
    )
    triton_model: str = _setting(
        "TRITON_MODEL",
        str.strip,
        "Ensemble called when the NSFW check is off.",
        default=Model.TXT2IMG.value,
    )
    triton_nsfw_model: str = _setting(
        "TRITON_NSFW_MODEL",
        str.strip,
        "Ensemble called when the NSFW check is on.",
        default=Model.TXT2IMG_NSFW.value,
    )
    probe_timeout_s: float = _setting(
        "PROBE_TIMEOUT_S",
        float,
        "Timeout of each Triton probe made by `/readyz` (seconds).",
        default=2.0,
    )
    ready_cache_s: float = _setting(
        "READY_CACHE_S",
        float,
        "How long one `/readyz` check (a round of Triton probes and a metrics scrape) answers "
        "every caller of a process (seconds); 0: each call checks.",
        default=1.0,
    )
    retry_after_s: int = _setting(
        "RETRY_AFTER_S",
        int,
        "Retry-After value (seconds) sent with 429 and 503 answers.",
        default=5,
    )
    jpeg_quality: int = _setting(
        "JPEG_QUALITY", int, "JPEG quality of the returned/uploaded image (1-95).", default=90
    )
    upload_naming: NamingPolicy = _setting(
        "UPLOAD_NAMING",
        _parse_naming,
        "`rewrite`: the URL's file name becomes `{image_hash}.jpg` (the spec); "
        "`keep`: PUT to the URL exactly as given.",
        default=NamingPolicy.REWRITE,
    )
    upload_allowed_hosts: tuple[str, ...] = _setting(
        "UPLOAD_ALLOWED_HOSTS",
        _parse_hosts,
        "Comma list of `host[:port]` the gateway may PUT to, over https only unless the entry "
        "starts with `http://`; without a port, ports 80/443 only. `*.suffix` matches "
        "subdomains, `*` any public host. Host names, exact or wildcard, reach public addresses "
        "only; an entry that is an IP literal (`http://10.0.0.5:9000`, `[fd00::5]`) may reach "
        "that loopback or private address. Empty: every upload is refused.",
        default=(),
    )
    upload_backoff: tuple[float, ...] = _setting(
        "UPLOAD_BACKOFF",
        _parse_backoff,
        "Seconds to wait before each retry of a failed PUT; `1,2,4` is 4 attempts, empty is 1.",
        default=(1.0, 2.0, 4.0),
    )
    upload_timeout_s: float = _setting(
        "UPLOAD_TIMEOUT_S",
        float,
        "Deadline of each PUT attempt, connect to response (seconds): storage that answers "
        "slowly, even a byte at a time, is cut off at it and the attempt counts as a timeout.",
        default=10.0,
    )
    upload_budget_s: float | None = _setting(
        "UPLOAD_BUDGET_S",
        _parse_optional_float,
        "Longest one upload may take, every attempt and backoff included (seconds); no attempt "
        "starts or runs past it. Empty: UPLOAD_BACKOFF's attempts × UPLOAD_TIMEOUT_S plus its "
        "backoffs (47 by default).",
        default=None,
    )
    upload_headers: tuple[tuple[str, str], ...] = _setting(
        "UPLOAD_HEADERS",
        _parse_headers,
        "Extra PUT headers, `Name: value; Name2: value2` (e.g. `Content-Type: image/jpeg`). "
        "Only for storage that signed them: a presigned URL's signature covers headers.",
        default=(),
    )
    upload_ca_bundle: str | None = _setting(
        "UPLOAD_CA_BUNDLE",
        _parse_optional_str,
        "CA bundle file for https uploads; default: certifi's, else the system's.",
        default=None,
    )
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES", int, "Largest accepted request body (bytes); larger is 413.", default=65536
    )
    max_prompt_chars: int = _setting(
        "MAX_PROMPT_CHARS",
        int,
        "Longest `prompt` / `negative_prompt` (characters).",
        default=2000,
    )
    min_size: int = _setting("MIN_SIZE", int, "Smallest `width`/`height`.", default=64)
    max_size: int = _setting("MAX_SIZE", int, "Largest `width`/`height`.", default=2048)
    max_pixels: int = _setting(
        "MAX_PIXELS",
        int,
        "Largest `width`×`height` generated (before the 2× upscale).",
        default=1024 * 1024,
    )
    max_steps: int = _setting("MAX_STEPS", int, "Largest `num_inference_steps`.", default=100)
    max_guidance_scale: float = _setting(
        "MAX_GUIDANCE_SCALE", float, "Largest `guidance_scale`.", default=30.0
    )
    nvidia_api_url: str = _setting(
        "NVIDIA_API_URL",
        _parse_http_url,
        "NVIDIA's hosted deepfake-image-detection endpoint.",
        default="https://ai.api.nvidia.com/v1/cv/hive/deepfake-image-detection",
    )
    nvidia_assets_url: str = _setting(
        "NVIDIA_ASSETS_URL",
        _parse_http_url,
        "NVIDIA Cloud Functions' assets endpoint, for images over the inline limit.",
        default="https://api.nvcf.nvidia.com/v2/nvcf/assets",
    )
    nvidia_api_key: str | None = _setting(
        "NVIDIA_API_KEY",
        _parse_secret,
        "Bearer key for that endpoint; unset: `enable_deepfake_check` is refused (400). "
        "Never logged.",
        default=None,
        secret=True,
    )
    deepfake_budget_s: float = _setting(
        "DEEPFAKE_BUDGET_S",
        float,
        "Longest wait for the deepfake check, retries included (seconds); past it the status "
        "is `timeout` and the score 1.0.",
        default=10.0,
    )
    deepfake_max_image_bytes: int = _setting(
        "DEEPFAKE_MAX_IMAGE_BYTES",
        int,
        "Largest image sent to the deepfake API (bytes); larger ones are not sent (status "
        "`too_large`).",
        default=10 * 1024 * 1024,
    )
    deepfake_inline_max_bytes: int = _setting(
        "DEEPFAKE_INLINE_MAX_BYTES",
        int,
        "Largest image sent inline (bytes); larger ones go through NVCF's asset upload. The "
        f"default is the largest whose base64 stays under NVIDIA's inline limit of "
        f"{INLINE_LIMIT_CHARS} characters.",
        default=INLINE_MAX_BYTES,
    )
    moderate_max_bytes: int = _setting(
        "MODERATE_MAX_BYTES", int, "Largest image accepted by `/moderate` (bytes).", default=10485760
    )
    moderate_max_pixels: int = _setting(
        "MODERATE_MAX_PIXELS",
        int,
        "Largest image accepted by `/moderate` (width×height), checked before decoding.",
        default=4096 * 4096,
    )
    moderate_max_in_flight: int = _setting(
        "MODERATE_MAX_IN_FLIGHT",
        int,
        "Most `/moderate` requests one process works on at once (MAX_IN_FLIGHT is apart); the next "
        "gets 429 with Retry-After. Each may hold one full-size decoded image: see "
        "[its memory](security.md#moderate-memory-and-cpu).",
        default=1,
    )
    host: str = _setting("HOST", str.strip, "gunicorn bind address.", default="127.0.0.1")
    port: int = _setting("PORT", int, "gunicorn bind port.", default=8080)
    probe_port: int | None = _setting(
        "PROBE_PORT",
        _parse_optional_int,
        "A port of their own for `/healthz`, `/readyz` and `/metrics` (on HOST), served by "
        "threads of their own in every worker: they never wait behind requests. The front "
        "door's probe port proxies to it. Empty: none.",
        default=None,
    )
    workers: int = _setting("WORKERS", int, "gunicorn worker processes.", default=1)
    threads: int = _setting(
        "THREADS", int, "Threads per gunicorn worker (requests served at once).", default=10
    )
    metrics_dir: str | None = _setting(
        "METRICS_DIR",
        _parse_optional_str,
        "Directory shared by the workers' Prometheus counters (multi-process mode); "
        "gunicorn.conf.py makes one when WORKERS > 1 and this is unset.",
        default=None,
    )
    log_level: str = _setting(
        "LOG_LEVEL", lambda s: s.strip().upper(), "Log level of the gateway.", default="INFO"
    )
    api_keys: tuple[str, ...] = _setting(
        "API_KEYS",
        parse_api_keys,
        "Comma list of API keys; clients send `Authorization: Bearer <key>`. Empty (and no key "
        "file): no authentication, which the gateway warns about at start.",
        default=(),
        secret=True,
    )
    api_keys_file: str | None = _setting(
        "API_KEYS_FILE",
        _parse_optional_str,
        "File with more API keys, one a line (`#` comments); read at start, so rotate with a "
        "reload (gunicorn HUP).",
        default=None,
    )
    allow_anonymous: bool = _setting(
        "ALLOW_ANONYMOUS",
        _parse_bool,
        "`true` lets the gateway start without API_KEYS or API_KEYS_FILE and serve everyone who "
        "reaches it (the local `make serve` sets it); otherwise it refuses to start keyless.",
        default=False,
    )
    tenants_file: str | None = _setting(
        "TENANTS_FILE",
        _parse_optional_str,
        "TOML file of named tenants, each with the SHA-256 of its keys, its quotas and its "
        "priority ([Tenants](tenants.md)); read at start. Keys in API_KEYS and API_KEYS_FILE "
        "belong to the tenant `default`, whose quotas are the DEFAULT_* settings.",
        default=None,
    )
    default_requests_per_minute: int = _setting(
        "DEFAULT_REQUESTS_PER_MINUTE",
        int,
        "Requests a minute (`POST /generate` and `POST /jobs` together) of the `default` "
        "tenant, counted across every gateway in Redis; 0: no limit.",
        default=0,
    )
    default_max_concurrent: int = _setting(
        "DEFAULT_MAX_CONCURRENT",
        int,
        "Generations in flight at once (synchronous and running jobs) of the `default` tenant, "
        "across every gateway and worker; 0: no limit.",
        default=0,
    )
    default_priority: Priority = _setting(
        "DEFAULT_PRIORITY",
        parse_priority,
        "Triton priority of the `default` tenant's `/generate` calls: `interactive` (ahead of "
        "queued batch work) or `batch`. Jobs always run as batch work.",
        default=Priority.INTERACTIVE,
    )
    quota_fail_open: bool = _setting(
        "QUOTA_FAIL_OPEN",
        _parse_bool,
        "With Redis unreachable, `true` admits requests without counting them (each one counted "
        "in gateway_quota_unchecked_total, and MAX_IN_FLIGHT still bounds each process); "
        "`false` answers 503.",
        default=True,
    )
    max_in_flight: int = _setting(
        "MAX_IN_FLIGHT",
        int,
        "Most `/generate` requests one process works on at once; the next gets 429 with "
        f"Retry-After. THREADS must exceed it by {SPARE_THREADS} (gunicorn does not start "
        "otherwise), so that quick answers never wait behind generations.",
        default=8,
    )
    shutdown_timeout_s: float | None = _setting(
        "SHUTDOWN_TIMEOUT_S",
        _parse_optional_float,
        "How long SIGTERM waits for requests in flight (seconds). Empty: the longest a request "
        "can take, TRITON_DEADLINE_S + every upload attempt and backoff + 5 (172 by default).",
        default=None,
    )
    log_prompt_chars: int = _setting(
        "LOG_PROMPT_CHARS",
        int,
        "How much of the prompt the request log shows (characters); 0: none.",
        default=64,
    )
    nsfw_threshold: float = _setting(
        "NSFW_THRESHOLD",
        float,
        "`nsfw` is true when `nsfw_score` is at or above this (and whenever the check timed out "
        "or failed); 0..1.",
        default=0.5,
    )
    triton_classifier_model: str = _setting(
        "TRITON_CLASSIFIER_MODEL",
        str.strip,
        "The NSFW classifier `/moderate` calls alone.",
        default=Model.CLASSIFIER.value,
    )
    triton_queue_timeout_s: float | None = _setting(
        "TRITON_QUEUE_TIMEOUT_S",
        _parse_optional_float,
        "Longest a request may wait in the diffusion model's queue (seconds); past it the answer "
        "is 503. Empty: the model's `default_timeout_microseconds` (60 s).",
        default=None,
    )
    trusted_proxies: tuple[str, ...] = _setting(
        "TRUSTED_PROXIES",
        _parse_networks,
        "Comma list of addresses or networks (CIDR) whose `X-Forwarded-For` the gateway "
        "believes: the front door's, on loopback. From them the header's last address is the "
        "client's (in the access log); any other peer is the client itself, whatever it sends.",
        default=("127.0.0.1", "::1"),
    )
    triton_refresh_s: float = _setting(
        "TRITON_REFRESH_S",
        float,
        "How often each gateway process resolves TRITON_URL again and asks every replica "
        "whether it is ready (seconds): a replica added behind the name takes calls, and one "
        "removed or draining stops taking them, within this time.",
        default=5.0,
    )

    redis_url: str | None = _setting(
        "REDIS_URL",
        _parse_redis_url,
        "The Redis that holds jobs, their queue and Idempotency-Key records, shared by every "
        "gateway and job worker (`make serve`: redis://127.0.0.1:6379/0). Unset: `/jobs` and "
        "`Idempotency-Key` answer 503.",
        default=None,
        secret=True,  # a URL may carry a password
    )
    redis_timeout_s: float = _setting(
        "REDIS_TIMEOUT_S",
        float,
        "Bound on every call to Redis (connect and each command), seconds; past it the store "
        "counts as down for that request (503 with Retry-After where the store is needed).",
        default=2.0,
    )
    job_ttl_s: int = _setting(
        "JOB_TTL_S", int, "How long a finished job stays readable (seconds), then 404.",
        default=86400,
    )
    job_deadline_s: float = _setting(
        "JOB_DEADLINE_S",
        float,
        "Deadline of a job's generation in Triton (seconds), as TRITON_DEADLINE_S is for "
        "`/generate`; jobs are for long work, so it is longer.",
        default=600.0,
    )
    job_max_wait_s: float = _setting(
        "JOB_MAX_WAIT_S",
        float,
        "Longest `Prefer: wait=N` a `POST /jobs` is held for (seconds); 0 turns waiting off.",
        default=60.0,
    )
    idempotency_ttl_s: int = _setting(
        "IDEMPOTENCY_TTL_S",
        int,
        "How long an `Idempotency-Key` and its stored answer are kept (seconds).",
        default=86400,
    )
    webhook_secrets: tuple[str, ...] = _setting(
        "WEBHOOK_SECRETS",
        parse_webhook_secrets,
        "Comma list of Standard Webhooks secrets (`whsec_` + base64); deliveries carry one "
        "signature per secret, so a receiver keeps working while secrets rotate. Unset: a job "
        "with a `webhook` is refused (400).",
        default=(),
        secret=True,
    )
    webhook_allowed_hosts: tuple[str, ...] = _setting(
        "WEBHOOK_ALLOWED_HOSTS",
        _parse_hosts,
        "Hosts a job's `webhook` may name, in UPLOAD_ALLOWED_HOSTS' form; https only unless "
        "an entry names http:// explicitly. Empty: any public https host.",
        default=(),
    )
    webhook_backoff: tuple[float, ...] = _setting(
        "WEBHOOK_BACKOFF",
        _parse_schedule,
        "Seconds before each retry of a webhook delivery that failed (connection error, "
        "timeout, non-2xx); 410 stops at once. The default gives up after about 7 hours.",
        default=(5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 18000.0),
    )
    webhook_timeout_s: float = _setting(
        "WEBHOOK_TIMEOUT_S", float, "Timeout of one webhook delivery (seconds).", default=10.0
    )
    worker_threads: int = _setting(
        "WORKER_THREADS",
        int,
        "Jobs one worker process runs at once; at least the diffusion model's max_batch_size, "
        "so that queued jobs of one shape share a denoising pass.",
        default=16,
    )
    worker_metrics_port: int | None = _setting(
        "WORKER_METRICS_PORT",
        _parse_optional_int,
        "Port of a job worker's /metrics (Prometheus); empty: none.",
        default=8082,
    )
    worker_requeue_s: float = _setting(
        "WORKER_REQUEUE_S",
        float,
        "A worker that has not been heard from for this long (seconds) is dead: the jobs it "
        "held go back to the queue and run again.",
        default=60.0,
    )

    def __post_init__(self) -> None:
        problems = [msg for ok, msg in self._checks() if not ok]
        if problems:
            raise SettingsError("invalid gateway settings: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (
                _target_problem(self.triton_url) is None,
                f"{PREFIX}TRITON_URL: {_target_problem(self.triton_url)}",
            ),
            (
                0 < self.triton_refresh_s <= 300,
                f"{PREFIX}TRITON_REFRESH_S must be in (0, 300]",
            ),
            (self.triton_deadline_s > 0, f"{PREFIX}TRITON_DEADLINE_S must be > 0"),
            (self.probe_timeout_s > 0, f"{PREFIX}PROBE_TIMEOUT_S must be > 0"),
            (0 <= self.ready_cache_s <= 60, f"{PREFIX}READY_CACHE_S must be in 0..60"),
            (self.retry_after_s >= 0, f"{PREFIX}RETRY_AFTER_S must be >= 0"),
            (1 <= self.jpeg_quality <= 95, f"{PREFIX}JPEG_QUALITY must be in 1..95"),
            (self.upload_timeout_s > 0, f"{PREFIX}UPLOAD_TIMEOUT_S must be > 0"),
            (
                self.upload_budget_s is None or self.upload_budget_s > 0,
                f"{PREFIX}UPLOAD_BUDGET_S must be > 0",
            ),
            (self.max_body_bytes >= 1024, f"{PREFIX}MAX_BODY_BYTES must be >= 1024"),
            (self.max_prompt_chars >= 1, f"{PREFIX}MAX_PROMPT_CHARS must be >= 1"),
            (
                8 <= self.min_size <= self.max_size and self.min_size % 8 == 0,
                f"{PREFIX}MIN_SIZE must be a multiple of 8, >= 8 and <= MAX_SIZE",
            ),
            (self.max_size % 8 == 0, f"{PREFIX}MAX_SIZE must be a multiple of 8"),
            (
                self.max_pixels >= self.min_size * self.min_size,
                f"{PREFIX}MAX_PIXELS must allow at least MIN_SIZE×MIN_SIZE",
            ),
            (1 <= self.max_steps <= 1000, f"{PREFIX}MAX_STEPS must be in 1..1000"),
            (self.max_guidance_scale > 0, f"{PREFIX}MAX_GUIDANCE_SCALE must be > 0"),
            (self.deepfake_budget_s > 0, f"{PREFIX}DEEPFAKE_BUDGET_S must be > 0"),
            (self.deepfake_max_image_bytes >= 1, f"{PREFIX}DEEPFAKE_MAX_IMAGE_BYTES must be >= 1"),
            (
                1 <= self.deepfake_inline_max_bytes <= INLINE_MAX_BYTES,
                f"{PREFIX}DEEPFAKE_INLINE_MAX_BYTES must be in 1..{INLINE_MAX_BYTES}, NVIDIA's limit",
            ),
            (self.moderate_max_bytes >= 1024, f"{PREFIX}MODERATE_MAX_BYTES must be >= 1024"),
            (self.moderate_max_pixels >= 1, f"{PREFIX}MODERATE_MAX_PIXELS must be >= 1"),
            (self.moderate_max_in_flight >= 1, f"{PREFIX}MODERATE_MAX_IN_FLIGHT must be >= 1"),
            (0 < self.port < 65536, f"{PREFIX}PORT must be in 1..65535"),
            (
                self.probe_port is None or (0 < self.probe_port < 65536 and self.probe_port != self.port),
                f"{PREFIX}PROBE_PORT must be in 1..65535 and not PORT",
            ),
            (self.workers >= 1, f"{PREFIX}WORKERS must be >= 1"),
            (self.threads >= 1, f"{PREFIX}THREADS must be >= 1"),
            (
                self.log_level in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"},
                f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL",
            ),
            (self.max_in_flight >= 1, f"{PREFIX}MAX_IN_FLIGHT must be >= 1"),
            (
                self.shutdown_timeout_s is None or self.shutdown_timeout_s > 0,
                f"{PREFIX}SHUTDOWN_TIMEOUT_S must be > 0",
            ),
            (self.log_prompt_chars >= 0, f"{PREFIX}LOG_PROMPT_CHARS must be >= 0"),
            (0 <= self.nsfw_threshold <= 1, f"{PREFIX}NSFW_THRESHOLD must be in 0..1"),
            (bool(self.triton_classifier_model), f"{PREFIX}TRITON_CLASSIFIER_MODEL is empty"),
            (
                self.triton_queue_timeout_s is None or self.triton_queue_timeout_s > 0,
                f"{PREFIX}TRITON_QUEUE_TIMEOUT_S must be > 0",
            ),
            (self.redis_timeout_s > 0, f"{PREFIX}REDIS_TIMEOUT_S must be > 0"),
            (self.job_ttl_s >= 60, f"{PREFIX}JOB_TTL_S must be >= 60"),
            (self.job_deadline_s > 0, f"{PREFIX}JOB_DEADLINE_S must be > 0"),
            (self.job_max_wait_s >= 0, f"{PREFIX}JOB_MAX_WAIT_S must be >= 0"),
            (self.idempotency_ttl_s >= 60, f"{PREFIX}IDEMPOTENCY_TTL_S must be >= 60"),
            (self.webhook_timeout_s > 0, f"{PREFIX}WEBHOOK_TIMEOUT_S must be > 0"),
            (self.worker_threads >= 1, f"{PREFIX}WORKER_THREADS must be >= 1"),
            (
                self.worker_metrics_port is None or 0 < self.worker_metrics_port < 65536,
                f"{PREFIX}WORKER_METRICS_PORT must be in 1..65535",
            ),
            (self.worker_requeue_s >= 1, f"{PREFIX}WORKER_REQUEUE_S must be >= 1"),
            (
                self.default_requests_per_minute >= 0,
                f"{PREFIX}DEFAULT_REQUESTS_PER_MINUTE must be >= 0",
            ),
            (self.default_max_concurrent >= 0, f"{PREFIX}DEFAULT_MAX_CONCURRENT must be >= 0"),
        ]

    @property
    def upload_attempts(self) -> int:
        return len(self.upload_backoff) + 1

    @property
    def longest_request_s(self) -> float:
        """The longest a request may take: the Triton deadline, every upload attempt and
        backoff, and 5 s for the rest."""
        upload = self.upload_attempts * self.upload_timeout_s + sum(self.upload_backoff)
        return self.triton_deadline_s + upload + 5

    @property
    def graceful_timeout_s(self) -> float:
        """How long a stopping worker lets requests in flight finish, uploads included."""
        if self.shutdown_timeout_s is not None:
            return self.shutdown_timeout_s
        return self.longest_request_s

    def threads_problem(self) -> str | None:
        """Why gunicorn's threads would leave quick answers waiting behind generations, or None."""
        if self.threads >= self.max_in_flight + SPARE_THREADS:
            return None
        return (
            f"{PREFIX}THREADS ({self.threads}) must be at least {PREFIX}MAX_IN_FLIGHT "
            f"({self.max_in_flight}) + {SPARE_THREADS}: the spare threads answer quick requests "
            "while every admitted generation is at work"
        )

    def anonymous_problem(self) -> str | None:
        """Why the gateway must not start, keyless without the explicit opt-out, or None."""
        keyed = self.api_keys or self.api_keys_file is not None or self.tenants_file is not None
        if keyed or self.allow_anonymous:
            return None
        return (
            f"no API key: set {PREFIX}API_KEYS, {PREFIX}API_KEYS_FILE or {PREFIX}TENANTS_FILE, or "
            f"{PREFIX}ALLOW_ANONYMOUS=true to serve everyone who can reach this gateway"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from `GATEWAY_*` variables; unknown `GATEWAY_*` names are errors."""
        return cls(**fields_from_env(cls, environ, PREFIX, SettingsError, "settings"))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def fields_from_env(
    cls: type, environ: Mapping[str, str], prefix: str, error: type[Exception], what: str
) -> dict[str, Any]:
    """The values of the dataclass `cls`'s fields that `environ` sets (`prefix` + each field's
    `env`, parsed by its `parse`); a value that does not parse, or a `prefix` variable no field
    knows, raises `error`. A secret field's value is never shown."""
    values: dict[str, Any] = {}
    known = set()
    for f in dataclasses.fields(cls):
        name = prefix + f.metadata["env"]
        known.add(name)
        if name not in environ:
            continue
        try:
            values[f.name] = f.metadata["parse"](environ[name])
        except ValueError as exc:
            shown = "(secret)" if f.metadata.get("secret") else repr(environ[name])
            raise error(f"{name}={shown}: {exc}") from None
    # A misspelt variable would otherwise be ignored silently, the same failure as a
    # misspelt request field.
    unknown = sorted(k for k in environ if k.startswith(prefix) and k not in known)
    if unknown:
        raise error(f"unknown {what}: {', '.join(unknown)}")
    return values


def _target_problem(url: str) -> str | None:
    try:
        parse_target(url)
    except ValueError as exc:
        return str(exc)
    return None


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the docs' settings page, `--help`."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            shown = ",".join(_fmt(item) for item in default)
        elif default is None:
            shown = ""
        else:
            shown = _fmt(default)
        rows.append((PREFIX + f.metadata["env"], shown, f.metadata["doc"]))
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
