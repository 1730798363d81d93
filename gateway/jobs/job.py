"""The job resource: its status words, the record the store keeps, and the object clients see.

A job is a `/generate` request run later by a worker. Its record holds what the worker needs
(the request body, the webhook, who owns it); the object a client reads (`JobObject`) is the
public part of it, the same on every gateway and in every webhook delivery.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from gateway.schema import described
from gateway.vocabulary import JobStatus

# 24 random bytes: 192 bits, URL-safe, unguessable (an id is the only capability a reader of
# another owner's job would need besides the key, and the store checks the owner too).
_ID_BYTES = 24
ID_PATTERN = r"^job_[A-Za-z0-9_-]{32}$"


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(_ID_BYTES)


def rfc3339(moment: float | None) -> str | None:
    if moment is None:
        return None
    stamp = datetime.fromtimestamp(moment, timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobUrls:
    get: str = described("GET it here.")
    cancel: str = described("POST here to cancel it.")


@dataclass(frozen=True)
class JobObject:
    """A job as clients see it (GET /jobs/{id}, POST /jobs, webhook deliveries)."""

    id: str = described("The job's id: 192 random bits.", pattern=ID_PATTERN)
    tenant: str = described(
        "The tenant whose key made it (its name in the tenants file; `default` for the keys of "
        "the settings, `anonymous` with no key configured). Its queue and `max_concurrent` are "
        "that tenant's."
    )
    status: JobStatus = described(
        "queued → running → succeeded | failed | canceled (a queued job may be canceled "
        "before it runs)."
    )
    created_at: str = described("When it was accepted (RFC 3339, UTC).", format="date-time")
    started_at: str | None = described(
        "When a worker started it (RFC 3339, UTC); null while queued. A job taken up again "
        "after its worker died shows the second start.",
        format="date-time",
    )
    completed_at: str | None = described(
        "When it ended (RFC 3339, UTC); null until then.", format="date-time"
    )
    # The use case's own data types (S3Data); the OpenAPI document names them.
    data: Any = described(
        "On succeeded: exactly the `data` of a `/generate` answer (URL, hash, nsfw_score, "
        "nsfw, upload status...); on failed with upload_failed: the same block, as the 502 "
        "of /generate carries it; otherwise null."
    )
    error: Any = described(
        "On failed: the error object `/generate` would have answered; on canceled: code "
        "`canceled`; otherwise null."
    )
    urls: JobUrls = described("Where to read and cancel it.")


@dataclass(frozen=True)
class JobRecord:
    """What the store keeps for a job. `owner` scopes it to one API key (a digest, never the
    key); `tenant` names that key's tenant (a name, never a key); `request` is the validated
    /generate body, which only the worker reads again."""

    id: str
    owner: str
    status: JobStatus
    created_at: float
    request: dict[str, Any]
    webhook: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    data: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    attempts: int = 0  # how many times a worker took it up (a dead worker's job runs again)
    extra: dict[str, Any] = field(default_factory=dict)
    # Records stored before tenants name none: their keys were the settings' keys, `default`'s.
    tenant: str = "default"

    def to_store(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "status": self.status.value,
            "created_at": self.created_at,
            "request": self.request,
            "webhook": self.webhook,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "data": self.data,
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "attempts": self.attempts,
            "extra": self.extra,
            "tenant": self.tenant,
        }

    @classmethod
    def from_store(cls, raw: dict[str, Any]) -> JobRecord:
        return cls(**{**raw, "status": JobStatus(raw["status"])})

    def with_(self, **changes: Any) -> JobRecord:
        return replace(self, **changes)

    def public(self, base_path: str = "/jobs") -> JobObject:
        path = f"{base_path}/{self.id}"
        return JobObject(
            id=self.id,
            tenant=self.tenant,
            status=self.status,
            created_at=rfc3339(self.created_at) or "",
            started_at=rfc3339(self.started_at),
            completed_at=rfc3339(self.completed_at),
            data=self.data,
            error=self.error,
            urls=JobUrls(get=path, cancel=f"{path}/cancel"),
        )
