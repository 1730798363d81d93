"""Webhook deliveries against a real receiver on loopback (the scripted fault server), every one
verified with `standardwebhooks`, the spec's reference library, never with the gateway's code:
signatures per configured secret, the exact body, retries under one `webhook-id`, 410, redirects,
a receiver that never answers, addresses the gateway may not reach, the URL check of POST /jobs,
logs without secrets, and the delivery metric."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import runpy
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from gateway import Settings
from gateway.errors import InvalidRequest
from gateway.jobs.webhooks import (
    ANY_PUBLIC_HOST,
    USER_AGENT,
    Attempt,
    Webhooks,
    check_webhook_url,
    deliver,
    next_delay,
)
from gateway.metrics import Metrics, NullMetrics
from gateway.upload.urls import AllowedUrl
from gateway.vocabulary import WebhookOutcome
from tests.gateway.faults import HANG, FaultServer, Respond, Trap
from tests.gateway.test_metrics import value
from tests.gateway.upload.test_egress import Pki


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRETS = (new_secret(), new_secret())  # the one signing now and the next, mid-rotation
OTHER_SECRET = new_secret()  # configured nowhere
JOB_ID = "job_7f3a9c"
MSG_ID = f"msg_{JOB_ID}_succeeded"
# A job object as the worker sends it: JSON, non-ASCII kept as UTF-8, so the signature must
# cover the bytes, not an ASCII re-encoding.
JOB = {
    "id": JOB_ID,
    "status": "succeeded",
    "data": {"prompt_echo": "café ☕", "image_hash": "9e107d9d372bb6826bd81d3542a419d6"},
    "error": None,
}
BODY = json.dumps(JOB, ensure_ascii=False, separators=(",", ":")).encode()
DEFAULT_BACKOFF = Settings().webhook_backoff
DOCS = Path(__file__).resolve().parents[3] / "docs" / "webhooks.md"


def settings_for(
    receiver: FaultServer | None = None,
    *,
    secrets: tuple[str, ...] = SECRETS,
    allowed: tuple[str, ...] | None = None,
    backoff: tuple[float, ...] = (0.0, 0.0),
    timeout_s: float = 5.0,
) -> Settings:
    """The receiver allowed by an IP-literal entry naming http://, as operators allow their own
    loopback or private receivers; the schedule's delays 0 so the tests never wait on them."""
    if allowed is None:
        allowed = (f"http://{receiver.hostport}",) if receiver is not None else ()
    return Settings(
        webhook_secrets=secrets,
        webhook_allowed_hosts=allowed,
        webhook_backoff=backoff,
        webhook_timeout_s=timeout_s,
    )


def allowed_url(receiver: FaultServer, path: str = "/hooks/imagegen") -> AllowedUrl:
    return check_webhook_url(f"{receiver.url}{path}", settings_for(receiver))


def attempt_once(url: AllowedUrl, *, timeout_s: float = 5.0, **kwargs: object) -> Attempt:
    return deliver(url, MSG_ID, BODY, secrets=SECRETS, timeout_s=timeout_s, **kwargs)  # type: ignore[arg-type]


def verified(secret: str, body: bytes, headers: dict[str, str]) -> object:
    return Webhook(secret).verify(body, headers)


class Resolver:
    """A scripted DNS: the same answer every time, calls counted."""

    def __init__(self, answer: Sequence[str] | Exception) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


# -- what is sent --------------------------------------------------------------------------------


def test_a_delivery_verifies_under_each_configured_secret_and_not_under_another(
    fault_server: FaultServer,
) -> None:
    before = int(time.time())
    attempt = attempt_once(allowed_url(fault_server, "/hooks/imagegen?token=abc"))
    assert attempt.outcome is WebhookOutcome.DELIVERED and attempt.status == 200
    [received] = fault_server.requests
    assert received.method == "POST"
    assert received.target == "/hooks/imagegen?token=abc"
    assert received.body == BODY  # exactly the job object's bytes
    headers = {name.lower(): v for name, v in received.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    assert headers["webhook-id"] == MSG_ID
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret in SECRETS:  # either side of a rotation verifies
        assert verified(secret, received.body, received.headers) == JOB
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verified(OTHER_SECRET, received.body, received.headers)
    tampered = received.body.replace(b"succeeded", b"failed___")
    with pytest.raises(WebhookVerificationError):
        verified(SECRETS[0], tampered, received.headers)


def test_a_url_without_a_path_is_posted_to_the_root(fault_server: FaultServer) -> None:
    url = check_webhook_url(fault_server.url, settings_for(fault_server))
    assert attempt_once(url).outcome is WebhookOutcome.DELIVERED
    assert [r.target for r in fault_server.requests] == ["/"]


def test_nothing_is_sent_unsigned(fault_server: FaultServer) -> None:
    with pytest.raises(ValueError, match="unsigned"):
        deliver(allowed_url(fault_server), MSG_ID, BODY, secrets=(), timeout_s=5)
    assert fault_server.requests == []


# -- the schedule --------------------------------------------------------------------------------


def test_the_default_schedule_retries_within_a_minute_then_backs_off_then_gives_up() -> None:
    delays = [next_delay(n, DEFAULT_BACKOFF) for n in range(1, len(DEFAULT_BACKOFF) + 2)]
    assert delays == [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 18000.0, None]
    assert next_delay(1, ()) is None  # an empty schedule: one attempt only
    with pytest.raises(ValueError):
        next_delay(0, DEFAULT_BACKOFF)


def test_a_receiver_failing_twice_gets_the_third_attempt_with_the_same_id(
    fault_server: FaultServer,
) -> None:
    """Driven the way the worker drives it: attempt, ask the schedule, wait, attempt again."""
    fault_server.set_script(500, 500, 200)
    url = allowed_url(fault_server)
    backoff = (0.0, 0.0, 0.0)
    outcomes = []
    number = 1
    while True:
        attempt = attempt_once(url)
        outcomes.append(attempt.outcome)
        if attempt.outcome is not WebhookOutcome.RETRY:
            break
        delay = next_delay(number, backoff)
        assert delay is not None
        time.sleep(delay)
        number += 1
    assert outcomes == [WebhookOutcome.RETRY, WebhookOutcome.RETRY, WebhookOutcome.DELIVERED]
    assert len(fault_server.requests) == 3
    assert {r.headers["webhook-id"] for r in fault_server.requests} == {MSG_ID}
    for received in fault_server.requests:  # each attempt signed afresh, each one valid
        assert received.body == BODY
        assert verified(SECRETS[1], received.body, received.headers) == JOB


def test_the_sender_schedules_retries_and_counts_each_attempt_once(
    fault_server: FaultServer,
) -> None:
    fault_server.set_script(503, 502, 200)
    metrics = Metrics()
    webhooks = Webhooks(settings_for(fault_server, backoff=(0.0, 0.0, 0.0)), metrics)
    attempts = _drive(webhooks, f"{fault_server.url}/hook")
    assert [(a.outcome, a.status, a.retry_in) for a in attempts] == [
        (WebhookOutcome.RETRY, 503, 0.0),
        (WebhookOutcome.RETRY, 502, 0.0),
        (WebhookOutcome.DELIVERED, 200, None),
    ]
    text = metrics.render().decode()
    assert value(text, "worker_webhook_deliveries_total", outcome="retry") == 2
    assert value(text, "worker_webhook_deliveries_total", outcome="delivered") == 1
    assert value(text, "worker_webhook_deliveries_total", outcome="exhausted") == 0


def test_a_receiver_that_keeps_failing_exhausts_the_schedule(fault_server: FaultServer) -> None:
    fault_server.set_script(503)
    metrics = Metrics()
    webhooks = Webhooks(settings_for(fault_server, backoff=(0.0, 0.0)), metrics)
    attempts = _drive(webhooks, f"{fault_server.url}/hook")
    assert [a.outcome for a in attempts] == [
        WebhookOutcome.RETRY,
        WebhookOutcome.RETRY,
        WebhookOutcome.EXHAUSTED,
    ]
    assert attempts[-1].retry_in is None
    assert len(fault_server.requests) == 3  # 1 + len(backoff), then no more
    text = metrics.render().decode()
    assert value(text, "worker_webhook_deliveries_total", outcome="retry") == 2
    assert value(text, "worker_webhook_deliveries_total", outcome="exhausted") == 1


def _drive(webhooks: Webhooks, webhook: str) -> list[Attempt]:
    """The worker's loop: send attempt n, and attempt n + 1 when `retry_in` says so."""
    attempts = [webhooks.send(JOB_ID, webhook, MSG_ID, BODY, number=1)]
    while attempts[-1].retry_in is not None:
        assert len(attempts) < 10, "the schedule never ends"
        time.sleep(attempts[-1].retry_in)
        attempts.append(webhooks.send(JOB_ID, webhook, MSG_ID, BODY, number=len(attempts) + 1))
    return attempts


# -- answers that end a delivery, or must not move it -------------------------------------------


def test_410_is_gone_and_never_retried(fault_server: FaultServer) -> None:
    fault_server.set_script(410, 200)
    metrics = Metrics()
    attempts = _drive(Webhooks(settings_for(fault_server), metrics), f"{fault_server.url}/hook")
    assert [(a.outcome, a.status) for a in attempts] == [(WebhookOutcome.GONE, 410)]
    assert len(fault_server.requests) == 1
    assert value(metrics.render().decode(), "worker_webhook_deliveries_total", outcome="gone") == 1


def test_a_redirect_is_not_followed(fault_server: FaultServer) -> None:
    elsewhere = Trap()  # where the redirect points: nothing may connect to it
    try:
        location = f"http://127.0.0.1:{elsewhere.port}/internal"
        fault_server.set_script(Respond(307, headers=(("Location", location),)))
        attempt = attempt_once(allowed_url(fault_server))
        assert attempt.outcome is WebhookOutcome.RETRY and attempt.status == 307
        assert "not followed" in attempt.reason
        assert len(fault_server.requests) == 1
        assert elsewhere.connections == 0
    finally:
        elsewhere.stop()


def test_a_receiver_that_never_answers_is_cut_at_the_timeout(fault_server: FaultServer) -> None:
    fault_server.set_script(HANG)  # reads the request, answers when the test releases it
    timeout_s = 1.0
    started = time.monotonic()
    attempt = attempt_once(allowed_url(fault_server), timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert attempt.outcome is WebhookOutcome.RETRY and attempt.status is None
    assert "no answer within 1s" in attempt.reason
    # The receiver got the request (its thread may read it after the attempt ended, on a busy
    # machine) and still holds its answer: the attempt's deadline, not an answer, ended it.
    _wait_until(lambda: len(fault_server.requests) == 1, "the receiver has the request")
    assert fault_server.unanswered == 1
    fault_server.release()
    assert elapsed < timeout_s + 30  # slack for a loaded machine; the receiver held for 60 s


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Polls `condition`; `timeout_s` only stops a test that would hang."""
    ends = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < ends, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_a_closed_port_is_a_connection_failure_to_retry(closed_port: int) -> None:
    settings = settings_for(allowed=(f"http://127.0.0.1:{closed_port}",))
    url = check_webhook_url(f"http://127.0.0.1:{closed_port}/hook", settings)
    attempt = attempt_once(url)
    assert attempt.outcome is WebhookOutcome.RETRY and attempt.status is None


# -- where a delivery may go ---------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "169.254.169.254", "::1"])
def test_a_name_resolving_to_a_private_address_is_refused(
    fault_server: FaultServer, address: str
) -> None:
    """Allowed by name (not as an IP literal), so only public addresses may be reached."""
    host = f"hooks.test:{fault_server.port}"
    settings = settings_for(allowed=(f"http://{host}",))
    resolve = Resolver([address])
    attempt = attempt_once(check_webhook_url(f"http://{host}/hook", settings), resolve=resolve)
    assert attempt.outcome is WebhookOutcome.REFUSED
    assert "GATEWAY_WEBHOOK_ALLOWED_HOSTS" in attempt.reason
    assert resolve.calls == 1
    assert fault_server.requests == []


def test_localhost_by_name_is_refused_with_the_system_resolver(fault_server: FaultServer) -> None:
    host = f"localhost:{fault_server.port}"
    url = check_webhook_url(f"http://{host}/hook", settings_for(allowed=(f"http://{host}",)))
    assert attempt_once(url).outcome is WebhookOutcome.REFUSED
    assert fault_server.requests == []


def test_the_sender_refuses_at_delivery_what_the_allowlist_no_longer_allows(
    fault_server: FaultServer,
) -> None:
    webhook = f"{fault_server.url}/hook"
    check_webhook_url(webhook, settings_for(fault_server))  # allowed when the job was created
    metrics = Metrics()
    later = Webhooks(settings_for(allowed=("hooks.example.com",)), metrics)
    attempts = _drive(later, webhook)
    assert [a.outcome for a in attempts] == [WebhookOutcome.REFUSED]
    assert fault_server.requests == []
    text = metrics.render().decode()
    assert value(text, "worker_webhook_deliveries_total", outcome="refused") == 1


def test_a_name_that_does_not_resolve_now_is_retried(fault_server: FaultServer) -> None:
    host = f"hooks.test:{fault_server.port}"
    url = check_webhook_url(f"http://{host}/hook", settings_for(allowed=(f"http://{host}",)))
    attempt = attempt_once(url, resolve=Resolver(socket.gaierror(socket.EAI_AGAIN, "try again")))
    assert attempt.outcome is WebhookOutcome.RETRY
    assert fault_server.requests == []


def test_https_goes_to_the_checked_address_with_sni_and_certificate_of_the_name(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    sni: list[str | None] = []
    context = pki.server_context("hooks.test")
    context.sni_callback = lambda sock, name, ctx: sni.append(name)  # type: ignore[assignment,misc]
    receiver = FaultServer(tls=context).start()
    try:
        host = f"hooks.test:{receiver.port}"
        url = check_webhook_url(f"https://{host}/hook", settings_for(allowed=(host,)))
        resolve = Resolver(["127.0.0.1"])
        # A name, so only public addresses would pass: the operator's IP-literal entry is what
        # lets a private receiver in, and a name listed exactly is not one. Vouch for it here.
        vouched = replace(url, exact=True)
        attempt = attempt_once(vouched, resolve=resolve, ssl_context=pki.client_context())
        assert attempt.outcome is WebhookOutcome.DELIVERED, attempt
        [received] = receiver.requests
        assert sni == ["hooks.test"]
        assert received.headers["Host"] == host
        assert verified(SECRETS[0], received.body, received.headers) == JOB
        # A certificate for another name: not delivered, retried (the receiver may fix it).
        other = attempt_once(vouched, resolve=resolve, ssl_context=ssl.create_default_context())
        assert other.outcome is WebhookOutcome.RETRY and "TLS" in other.reason
        assert len(receiver.requests) == 1
    finally:
        receiver.stop()


# -- the check of POST /jobs ---------------------------------------------------------------------


def refusal(raw: object, settings: Settings) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        check_webhook_url(raw, settings)  # type: ignore[arg-type]
    assert err.value.status == 400
    assert err.value.field == "webhook"
    return err.value


def test_plain_http_needs_an_entry_that_names_it() -> None:
    exact = settings_for(allowed=("hooks.example.com",))
    assert "must be https" in refusal("http://hooks.example.com/h", exact).message
    assert "https" in refusal("http://hooks.example.com/h", settings_for(allowed=())).message
    explicit = settings_for(allowed=("http://hooks.example.com",))
    assert check_webhook_url("http://hooks.example.com/h", explicit).scheme == "http"


def test_a_host_outside_the_allowlist_is_refused() -> None:
    settings = settings_for(allowed=("hooks.example.com", "*.partner.example"))
    error = refusal("https://evil.example/h", settings)
    assert "GATEWAY_WEBHOOK_ALLOWED_HOSTS" in error.message
    refusal("https://hooks.example.com:8443/h", settings)  # no port in the entry: 443 only
    assert check_webhook_url("https://a.partner.example/h", settings).host == "a.partner.example"


def test_an_empty_allowlist_allows_any_public_https_host_by_name_only() -> None:
    assert ANY_PUBLIC_HOST == ("*",)
    url = check_webhook_url("https://hooks.example.com", settings_for(allowed=()))
    assert (url.host, url.port, url.path, url.exact) == ("hooks.example.com", 443, "/", False)
    # An IP literal matches the wildcard too, but is not vouched for: pinning keeps it public.
    assert not check_webhook_url("https://10.0.0.5/h", settings_for(allowed=())).exact


def test_no_secret_means_no_webhook() -> None:
    error = refusal("https://hooks.example.com/h", settings_for(secrets=(), allowed=()))
    assert "GATEWAY_WEBHOOK_SECRETS" in error.message


@pytest.mark.parametrize(
    "raw",
    [
        123,
        "",
        "hooks.example.com/h",
        "ftp://hooks.example.com/h",
        "https://user:pass@hooks.example.com/h",
        "https://hooks.example.com/h with space",
        "https://2130706433/h",  # 127.0.0.1 in a form resolvers accept
    ],
)
def test_malformed_webhooks_are_refused(raw: object) -> None:
    refusal(raw, settings_for(allowed=()))


# -- logs and metrics ----------------------------------------------------------------------------


def test_logs_name_the_job_outcome_and_host_and_never_a_secret(
    fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    fault_server.set_script(500, 200)
    token_path = "/hooks/T0KENPATH"
    webhook = f"{fault_server.url}{token_path}?token=QUERYTOKEN"
    with caplog.at_level(logging.DEBUG):
        attempts = _drive(Webhooks(settings_for(fault_server)), webhook)
    assert [a.outcome for a in attempts] == [WebhookOutcome.RETRY, WebhookOutcome.DELIVERED]
    lines = [r for r in caplog.records if r.name == "gateway.jobs.webhooks"]
    assert len(lines) == 2  # one per attempt
    for record, number, outcome, status in zip(
        lines, (1, 2), ("retry", "delivered"), (500, 200), strict=True
    ):
        message = record.getMessage()
        assert JOB_ID in message and outcome in message and str(status) in message
        assert f"attempt {number}" in message
        assert f"http://{fault_server.hostport}" in message
        assert (record.job_id, record.webhook_outcome, record.webhook_status) == (  # type: ignore[attr-defined]
            JOB_ID,
            outcome,
            status,
        )
        assert record.webhook_attempt == number  # type: ignore[attr-defined]
        assert record.webhook_host == "127.0.0.1"  # type: ignore[attr-defined]
    everything = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    signatures = [
        s.split(",", 1)[1]
        for r in fault_server.requests
        for s in r.headers["webhook-signature"].split(" ")
    ]
    assert len(signatures) == 4
    forbidden = [*SECRETS, *(s.removeprefix("whsec_") for s in SECRETS), *signatures]
    forbidden += ["QUERYTOKEN", "T0KENPATH"]
    for text in forbidden:
        assert text not in everything


def test_the_delivery_metric_has_every_outcome_at_zero_then_counts() -> None:
    metrics = Metrics()
    text = metrics.render().decode()
    for outcome in WebhookOutcome:
        assert value(text, "worker_webhook_deliveries_total", outcome=outcome.value) == 0
    metrics.webhook_delivered(WebhookOutcome.DELIVERED)
    metrics.webhook_delivered(WebhookOutcome.DELIVERED)
    metrics.webhook_delivered(WebhookOutcome.EXHAUSTED)
    text = metrics.render().decode()
    assert value(text, "worker_webhook_deliveries_total", outcome="delivered") == 2
    assert value(text, "worker_webhook_deliveries_total", outcome="exhausted") == 1
    assert value(text, "worker_webhook_deliveries_total", outcome="gone") == 0


def test_the_delivery_metric_takes_words_of_the_vocabulary_only() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.webhook_delivered("https://hooks.example.com/h")  # type: ignore[arg-type]
    text = metrics.render().decode()
    labels = {
        s.labels["outcome"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "worker_webhook_deliveries_total"
    }
    assert labels == {o.value for o in WebhookOutcome}
    NullMetrics().webhook_delivered(WebhookOutcome.GONE)  # the null recorder takes it too


# -- the docs ------------------------------------------------------------------------------------


def test_the_docs_show_the_default_schedule_every_outcome_and_the_user_agent() -> None:
    text = DOCS.read_text()
    units = {"s": 1, "min": 60, "h": 3600}
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text, re.MULTILINE)
    assert [int(number) for number, _ in rows] == list(range(1, len(DEFAULT_BACKOFF) + 2))
    delays = []
    for _, sent in rows[1:]:
        amount, unit = re.match(r"(\d+) (s|min|h) after", sent).groups()  # type: ignore[union-attr]
        delays.append(float(int(amount) * units[unit]))
    assert delays == list(DEFAULT_BACKOFF)
    for outcome in WebhookOutcome:
        assert f"| `{outcome.value}` |" in text
    assert USER_AGENT in text


def test_the_docs_receiver_verifies_deduplicates_and_refuses_a_forgery(
    fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The page's Python example, run as it is against deliveries a real attempt sent."""
    [example] = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    receiver = tmp_path / "receiver.py"
    receiver.write_text(example)
    monkeypatch.setenv("IMAGEGEN_WEBHOOK_SECRET", SECRETS[1])
    handled: list[object] = []
    namespace = runpy.run_path(str(receiver), init_globals={"handle": handled.append})
    fault_server.set_script(500, 200)
    _drive(Webhooks(settings_for(fault_server)), f"{fault_server.url}/hooks/imagegen")
    client = namespace["app"].test_client()  # type: ignore[attr-defined]
    for received in fault_server.requests:  # the same delivery twice: a retry
        answer = client.post("/hooks/imagegen", data=received.body, headers=received.headers)
        assert answer.status_code == 204
    assert handled == [JOB]
    forged = {**fault_server.requests[0].headers, "webhook-id": "msg_forged"}
    answer = client.post("/hooks/imagegen", data=BODY, headers=forged)
    assert answer.status_code == 400
    assert handled == [JOB]
