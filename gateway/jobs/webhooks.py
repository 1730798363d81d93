"""Webhooks: a finished job's object POSTed to the job's `webhook`, signed per Standard Webhooks v1.

    url = check_webhook_url(body["webhook"], settings)       # POST /jobs: a 400 naming `webhook`
    attempt = webhooks.send(job_id, webhook, msg_id, body, number=n)   # the worker, attempt n
    if attempt.retry_in is not None: ...  # attempt n + 1 is due in that many seconds

One delivery is one `webhook-id` (the caller's, the same on every retry) and up to
1 + len(GATEWAY_WEBHOOK_BACKOFF) attempts. Each attempt is signed afresh (`webhook-timestamp` is
its own time, so receivers' 5-minute window holds for a retry hours later) with one signature per
secret in GATEWAY_WEBHOOK_SECRETS, so receivers keep verifying while secrets rotate. The
signatures come from the `standardwebhooks` package, the spec's reference library, not our own
HMAC. Nothing is ever sent unsigned.

The URL takes the uploads' egress path (`gateway.upload`): the shape check, the allowlist
(GATEWAY_WEBHOOK_ALLOWED_HOSTS; empty allows any public https host), the host resolved once per
attempt with every address checked, and the connection made to those addresses only, within
GATEWAY_WEBHOOK_TIMEOUT_S from connect to the answer's status line.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import urllib3
from standardwebhooks import Webhook

from gateway.errors import InvalidRequest
from gateway.metrics import NULL_METRICS, Recorder
from gateway.settings import Settings
from gateway.upload.egress import Deadline, PinnedUrl, Resolve, connect, pin, system_resolve
from gateway.upload.urls import AllowedUrl, check_upload_url
from gateway.vocabulary import WebhookOutcome

log = logging.getLogger(__name__)

FIELD = "webhook"  # the field of POST /jobs
ALLOWLIST_SETTING = "GATEWAY_WEBHOOK_ALLOWED_HOSTS"
USER_AGENT = "imagegen-gateway-webhooks/0.1"
# What an empty GATEWAY_WEBHOOK_ALLOWED_HOSTS means (unlike uploads', where empty refuses all):
# any host over https on 443, public addresses only.
ANY_PUBLIC_HOST = ("*",)


def check_webhook_url(raw: str, settings: Settings) -> AllowedUrl:
    """The `webhook` of a POST /jobs, checked before anything is queued: an https URL (http only
    where an allowlist entry names `http://`) whose host the allowlist lets through. A 400 naming
    `webhook` otherwise, and always when no secret is configured. No DNS lookup happens here:
    every delivery attempt resolves and checks the host itself."""
    if not settings.webhook_secrets:
        raise InvalidRequest(
            "webhook cannot be used: this service has no webhook secret configured "
            "(GATEWAY_WEBHOOK_SECRETS), and it never sends unsigned deliveries",
            field=FIELD,
        )
    if not isinstance(raw, str):
        raise InvalidRequest("webhook must be a string (an https URL)", field=FIELD)
    return check_upload_url(
        raw,
        settings.webhook_allowed_hosts or ANY_PUBLIC_HOST,
        field=FIELD,
        file_name=False,
        setting=ALLOWLIST_SETTING,
    )


def next_delay(attempt_number: int, backoff: Sequence[float]) -> float | None:
    """Seconds to wait after attempt `attempt_number` (from 1) failed before the next one, or
    None when the schedule has no retry left (the delivery is `exhausted`)."""
    if attempt_number < 1:
        raise ValueError(f"attempts count from 1, got {attempt_number}")
    return float(backoff[attempt_number - 1]) if attempt_number <= len(backoff) else None


def signature_header(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """`webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per secret,
    space-separated."""
    if not secrets:
        raise ValueError("no webhook secret: unsigned deliveries are never sent")
    when = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    payload = body.decode("utf-8")  # a job object is JSON, UTF-8 by definition (RFC 8259)
    return " ".join(Webhook(secret).sign(msg_id, when, payload) for secret in secrets)


@dataclass(frozen=True)
class Attempt:
    """How one delivery attempt went. `deliver` answers delivered, retry, gone or refused;
    `Webhooks.send` settles a retry into `retry_in` seconds, or `exhausted`."""

    outcome: WebhookOutcome
    status: int | None = None  # the receiver's HTTP status; None when it never answered
    reason: str = ""  # for the log: never the URL's query, a secret or a signature
    retry_in: float | None = None


def deliver(
    url: AllowedUrl,
    msg_id: str,
    body: bytes,
    *,
    secrets: Sequence[str],
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
    resolve: Resolve = system_resolve,
) -> Attempt:
    """One attempt: resolve the host, check every address, POST the signed `body` to them only,
    within `timeout_s` from connect to the answer's status line. Never raises for anything the
    receiver or the network does."""
    if not secrets:
        raise ValueError("no webhook secret: unsigned deliveries are never sent")
    # Resolved here, not in `pin`, to tell a name that does not resolve now (retried: DNS
    # outages pass) from one that resolves where the gateway may not go (refused, for good).
    try:
        addresses = resolve(url.host, url.port)
    except (OSError, ValueError):  # gaierror, and UnicodeError for an unencodable name
        return Attempt(WebhookOutcome.RETRY, reason="the host does not resolve")
    if not addresses:
        return Attempt(WebhookOutcome.RETRY, reason="the host does not resolve")
    try:
        pinned = pin(
            url, resolve=lambda _host, _port: addresses, field=FIELD, setting=ALLOWLIST_SETTING
        )
    except InvalidRequest as exc:
        return Attempt(WebhookOutcome.REFUSED, reason=exc.message)
    with Deadline(timeout_s) as deadline:
        attempt = _post(pinned, msg_id, body, secrets, deadline, ssl_context)
        if deadline.expired:
            # Whatever the shut socket made of the answer, it was the deadline.
            return Attempt(WebhookOutcome.RETRY, reason=f"no answer within {timeout_s:g}s")
    return attempt


def _post(
    target: PinnedUrl,
    msg_id: str,
    body: bytes,
    secrets: Sequence[str],
    deadline: Deadline,
    ssl_context: ssl.SSLContext | None,
) -> Attempt:
    timestamp = int(time.time())
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(msg_id, timestamp, body, secrets),
    }
    conn = None
    try:
        conn = connect(target, deadline, ssl_context)
        conn.request(
            "POST",
            target.request_target,
            body=body,
            headers=headers,
            preload_content=False,
            decode_content=False,
        )
        # The status is all that counts: the answer's body is never read, so a receiver that
        # streams one forever holds nothing (the connection is closed below).
        status = conn.getresponse().status
    except ssl.SSLError as exc:
        return Attempt(WebhookOutcome.RETRY, reason=f"TLS error ({type(exc).__name__})")
    except (TimeoutError, urllib3.exceptions.TimeoutError) as exc:
        if isinstance(exc, urllib3.exceptions.NewConnectionError):  # refused or unreachable
            return Attempt(WebhookOutcome.RETRY, reason="connection failed")
        # The socket's own timeout is the deadline's too, and may fire before the timer does.
        return Attempt(WebhookOutcome.RETRY, reason=f"no answer within {deadline.seconds:g}s")
    except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
        # The exception's type only: its text may quote what the receiver sent.
        return Attempt(WebhookOutcome.RETRY, reason=f"connection error ({type(exc).__name__})")
    finally:
        if conn is not None:
            conn.close()
    if 200 <= status < 300:
        return Attempt(WebhookOutcome.DELIVERED, status)
    if status == 410:  # Standard Webhooks: the receiver wants no more of these
        return Attempt(WebhookOutcome.GONE, status, "410 Gone: no retry")
    if 300 <= status < 400:
        # Never followed: the allowlist and the address checks vetted this URL, and a redirect
        # names another one (an internal address, say) that nothing checked. A failure like any
        # other non-2xx, so retried: the receiver may fix its URL.
        return Attempt(WebhookOutcome.RETRY, status, f"HTTP {status}: redirect not followed")
    return Attempt(WebhookOutcome.RETRY, status, f"HTTP {status}")


@dataclass(frozen=True)
class Webhooks:
    """What a worker delivers with: the settings (secrets, allowlist, timeout, schedule) and its
    metrics. `ssl_context` and `resolve` are for tests (a private CA, a scripted DNS)."""

    settings: Settings
    metrics: Recorder = NULL_METRICS
    ssl_context: ssl.SSLContext | None = None
    resolve: Resolve = system_resolve

    def send(self, job_id: str, webhook: str, msg_id: str, body: bytes, *, number: int) -> Attempt:
        """Attempt `number` (from 1) of the delivery `msg_id` of job `job_id` to `webhook`: sent,
        then logged and counted once by what it led to. `retry_in` is when attempt `number + 1`
        is due; None when the delivery has ended (delivered, gone, refused, exhausted)."""
        settings = self.settings
        try:
            # Checked again at every attempt: the allowlist or the secrets may have changed
            # since the job was created, and the worker obeys the ones it has now.
            url = check_webhook_url(webhook, settings)
        except InvalidRequest as exc:
            attempt = Attempt(WebhookOutcome.REFUSED, reason=exc.message)
            url = None
        else:
            attempt = deliver(
                url,
                msg_id,
                body,
                secrets=settings.webhook_secrets,
                timeout_s=settings.webhook_timeout_s,
                ssl_context=self.ssl_context,
                resolve=self.resolve,
            )
        if attempt.outcome is WebhookOutcome.RETRY:
            delay = next_delay(number, settings.webhook_backoff)
            attempt = replace(
                attempt,
                outcome=WebhookOutcome.RETRY if delay is not None else WebhookOutcome.EXHAUSTED,
                retry_in=delay,
            )
        self.metrics.webhook_delivered(attempt.outcome)
        # The host only, never the path or the query: webhook URLs often carry their token in
        # either (Slack's and Discord's are in the path).
        host = f"{url.scheme.lower()}://{url.host_header}" if url is not None else "(not allowed)"
        log.log(
            logging.INFO if attempt.outcome is WebhookOutcome.DELIVERED else logging.WARNING,
            "webhook of job %s, attempt %d to %s: %s%s%s",
            job_id,
            number,
            host,
            attempt.outcome.value,
            f" ({attempt.reason})" if attempt.reason else f" (HTTP {attempt.status})",
            f"; next attempt in {attempt.retry_in:g}s" if attempt.retry_in is not None else "",
            extra={
                "job_id": job_id,
                "webhook_outcome": attempt.outcome.value,
                "webhook_status": attempt.status,
                "webhook_attempt": number,
                "webhook_host": url.host if url is not None else None,
            },
        )
        return attempt
