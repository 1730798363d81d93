"""`Idempotency-Key` on POST /generate and POST /jobs (IETF httpapi draft "The
Idempotency-Key HTTP Header Field"), kept in the shared store so that it holds across gateways.

A key is scoped to the API key and the path; a fingerprint of the body is stored with it.
- first request: a record `in_flight` is created (SET NX), the request runs, and its answer is
  stored for GATEWAY_IDEMPOTENCY_TTL_S;
- the same key again after that: the stored status and body, no second generation;
- again while the first is in flight: 409 with Retry-After;
- the same key with another body: 422;
- a malformed key: 400. A request refused by validation stores nothing (it is checked first).

What is stored: answers that say what happened to the generation (2xx, and the 502 of a failed
upload, which carries the image's hash). Other failures (Triton unavailable, overloaded, the
deadline) release the key instead: nothing was made, and the client's retry should run again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from gateway.errors import GatewayError, InvalidRequest, Unavailable, UploadFailed
from gateway.jobs.store import PREFIX, bounded, nothing
from gateway.vocabulary import IdempotencyOutcome

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_MAX_CHARS = 255
# The draft's form is a Structured Field string ("..."); bare tokens (Stripe's form) are taken
# too. Printable ASCII only: the key is echoed in no log, but it is stored and compared.
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])+)"')
_BARE = re.compile(r"[A-Za-z0-9._~:+/=-]+")


class KeyInFlight(GatewayError):
    status, code = 409, "idempotency_key_in_use"


class KeyMismatch(GatewayError):
    status, code = 422, "idempotency_key_mismatch"


def parse_key(raw: str | None) -> str | None:
    """The key of an `Idempotency-Key` header, None when there is none; 400 when malformed."""
    if raw is None:
        return None
    value = raw.strip()
    quoted = _QUOTED.fullmatch(value)
    key = re.sub(r'\\(["\\])', r"\1", quoted.group(1)) if quoted else value
    if not (quoted or _BARE.fullmatch(value)) or not 1 <= len(key) <= _MAX_CHARS:
        raise InvalidRequest(
            f'{HEADER} must be a string of 1 to {_MAX_CHARS} printable ASCII characters, '
            'e.g. "8e03978e-40d5-43e8-bc93-6894a57f9324"',
            field=HEADER,
        )
    return key


def fingerprint(payload: Any) -> str:
    """The body as the request's meaning: the same fields and values give the same print
    whatever the spacing or key order."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Stored:
    """A finished request's answer, as it is replayed."""

    status: int
    body: Any
    headers: dict[str, str]


@dataclass(frozen=True)
class Claim:
    """This request holds the key: it runs, then `complete`s or `release`s it."""

    record_key: str
    fingerprint: str


class IdempotencyStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int,
        in_flight_s: float,
        retry_after_s: int,
        failed: Callable[[], None] = nothing,
    ) -> None:
        self.client = client
        self.failed = failed
        self.ttl_s = ttl_s
        # An in-flight record outlives the longest request, so a gateway that died mid-request
        # does not hold the key for the whole TTL.
        self.in_flight_s = max(1, int(in_flight_s) + 1)
        self.retry_after_s = retry_after_s

    def claim(self, owner: str, path: str, key: str, print_: str) -> Claim | Stored:
        """Claim the key for this request, or the stored answer of an earlier one; raises 409
        (in flight) or 422 (another body)."""
        scope = hashlib.sha256(f"{owner}\n{path}\n{key}".encode()).hexdigest()
        record_key = f"{PREFIX}idempotency:{scope}"
        in_flight = json.dumps({"fingerprint": print_, "state": "in_flight"})
        with bounded(self.retry_after_s, "idempotency claim", self.failed):
            if self.client.set(record_key, in_flight, nx=True, ex=self.in_flight_s):
                return Claim(record_key, print_)
            raw = self.client.get(record_key)
        if raw is None:  # expired between the two calls: claim again
            return self.claim(owner, path, key, print_)
        record = json.loads(raw)
        if record["fingerprint"] != print_:
            raise KeyMismatch(
                f"this {HEADER} was used with a different request body", field=HEADER
            )
        if record["state"] == "in_flight":
            raise KeyInFlight(
                f"a request with this {HEADER} is still in progress; retry later",
                field=HEADER,
                retry_after=self.retry_after_s,
            )
        return Stored(record["status"], record["body"], record.get("headers", {}))

    def complete(self, claim: Claim, stored: Stored) -> None:
        record = {
            "fingerprint": claim.fingerprint,
            "state": "done",
            "status": stored.status,
            "body": stored.body,
            "headers": stored.headers,
        }
        with bounded(self.retry_after_s, "idempotency store", self.failed):
            self.client.set(claim.record_key, json.dumps(record), ex=self.ttl_s)

    def release(self, claim: Claim) -> None:
        """Forget an in-flight claim whose request made nothing (a retry runs again). Best
        effort: if the store is down now, the record expires with its in-flight time."""
        try:
            self.client.delete(claim.record_key)
        except (redis.ConnectionError, redis.TimeoutError):
            pass


def replays(exc: GatewayError) -> bool:
    """Whether a failure is stored for replay (module docstring): only a failed upload, whose
    image exists (the answer names its hash)."""
    return isinstance(exc, UploadFailed)


Answer = tuple[int, Any, dict[str, str]]  # status, JSON body, headers


def run_once(
    store: IdempotencyStore | None,
    scope: tuple[str, str],
    key: str,
    print_: str,
    run: Callable[[], Answer],
    *,
    counted: Callable[[IdempotencyOutcome], None],
) -> Answer:
    """`run` at most once per (owner, path) `scope` and `key`: its answer, or the stored answer
    of an earlier run (with `Idempotent-Replayed: true`, as Stripe's API marks one). A failure of `run` that is not stored releases the
    key and propagates. `store` None: the 503 of a gateway without one."""
    if store is None:
        raise Unavailable(f"{HEADER} needs a store: GATEWAY_REDIS_URL is unset")
    owner, path = scope
    try:
        claimed = store.claim(owner, path, key, print_)
    except KeyMismatch:
        counted(IdempotencyOutcome.MISMATCH)
        raise
    except KeyInFlight:
        counted(IdempotencyOutcome.CONFLICT)
        raise
    if isinstance(claimed, Stored):
        counted(IdempotencyOutcome.REPLAYED)
        return claimed.status, claimed.body, {**claimed.headers, REPLAYED_HEADER: "true"}
    try:
        answer = run()
    except GatewayError as exc:
        if not replays(exc):
            store.release(claimed)
            raise
        answer = (exc.status, exc.body(), _headers(exc))
    except BaseException:
        store.release(claimed)
        raise
    store.complete(claimed, Stored(*answer))
    counted(IdempotencyOutcome.STORED)
    return answer


def _headers(exc: GatewayError) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
