"""NVIDIA Cloud Functions' asset upload, for inputs too large to send inline.

NVCF user guide, "Asset Management": NVIDIA's hosted models take images inline only below
180,000 base64 characters; a larger one is uploaded first and referenced by its asset id.

1. `POST {assets_url}` with `{"contentType", "description"}` answers `{"assetId", "uploadUrl",
   "contentType", "description"}`; the upload URL is presigned and lives an hour.
2. `PUT` the bytes to `uploadUrl` with `Content-Type` and `x-amz-meta-nvcf-asset-description`
   equal to what was declared (both are signed into the URL). No key goes there.
3. The model is called with `data:<mime>;asset_id,<id>` in place of the base64 and the header
   `NVCF-INPUT-ASSET-REFERENCES: <id>` (`Asset.data_url`, `Asset.headers`).
4. `DELETE {assets_url}/{id}` once the answer is in: NVCF keeps an asset 24 h otherwise.

The upload URL comes from NVIDIA's answer, so it goes through the same egress rules as a
client's: https (plain http only on the assets API's own host, for a local stand-in), its host
resolved once and every address checked (no private ones), no redirects, and the signature in
its query string never logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.nvidia.api import NvidiaApi
from gateway.retry import RetryPolicy
from gateway.upload.egress import PinnedUrl, Resolve, pin, system_resolve
from gateway.upload.uploader import Uploader
from gateway.upload.urls import AllowedUrl, parse_upload_url
from gateway.vocabulary import ApiOutcome, AssetResult, UploadOutcome

log = logging.getLogger(__name__)

ASSET_REFERENCES_HEADER = "NVCF-INPUT-ASSET-REFERENCES"
DESCRIPTION_HEADER = "x-amz-meta-nvcf-asset-description"
# No client data in NVIDIA's metadata: a fixed description names the asset's purpose.
DESCRIPTION = "imagegen deepfake check"
# NVCF's asset ids are UUIDs; anything else must not reach a header or a data URL.
_ASSET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
_DELETE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Asset:
    id: str
    mime: str

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};asset_id,{self.id}"

    @property
    def headers(self) -> dict[str, str]:
        return {ASSET_REFERENCES_HEADER: self.id}


class AssetFailed(Exception):
    def __init__(self, result: AssetResult, reason: str) -> None:
        super().__init__(reason)
        self.result = result


class NvcfAssets:
    def __init__(
        self,
        *,
        url: str,
        api: NvidiaApi,
        policy: RetryPolicy,
        ssl_context: ssl.SSLContext | None = None,
        resolve: Resolve = system_resolve,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.api = api
        self.policy = policy
        self.ssl_context = ssl_context
        self.resolve = resolve
        self._sleep = sleep
        self._own = parse_upload_url(f"{self.url}/asset", field="GATEWAY_NVIDIA_ASSETS_URL")

    def upload(self, data: bytes, mime: str, deadline: float) -> Asset:
        """Create an asset and PUT `data` to it; raises AssetFailed."""
        # 1. Create the asset.
        created = self.api.call(
            "POST",
            self.url,
            body={"contentType": mime, "description": DESCRIPTION},
            deadline=deadline,
        )
        if created.outcome is not ApiOutcome.OK:
            failure = (
                AssetResult.TIMEOUT
                if created.outcome is ApiOutcome.TIMEOUT
                else AssetResult.CREATE_FAILED
            )
            raise AssetFailed(failure, f"creating the asset: {created.describe()}")
        record = created.json()
        asset_id = record.get("assetId") if isinstance(record, dict) else None
        upload_url = record.get("uploadUrl") if isinstance(record, dict) else None
        if not isinstance(asset_id, str) or not _ASSET_ID.fullmatch(asset_id):
            raise AssetFailed(AssetResult.CREATE_FAILED, "the asset record has no valid assetId")
        if not isinstance(upload_url, str):
            raise AssetFailed(AssetResult.CREATE_FAILED, "the asset record has no uploadUrl")
        # 2. Upload the bytes to the presigned URL, as declared.
        target = self._upload_target(upload_url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssetFailed(AssetResult.TIMEOUT, "the budget ran out before the upload")
        uploader = Uploader(
            policy=self.policy,
            timeout_s=remaining,
            headers=(("Content-Type", mime), (DESCRIPTION_HEADER, DESCRIPTION)),
            ssl_context=self.ssl_context,
            sleep=self._sleep,
        )
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        uploaded = uploader.put(target, data, md5, budget_s=remaining)
        if not uploaded.ok:
            last = uploaded.attempts[-1]
            result = (
                AssetResult.TIMEOUT
                if last.outcome is UploadOutcome.TIMEOUT and time.monotonic() >= deadline
                else AssetResult.UPLOAD_FAILED
            )
            raise AssetFailed(result, f"uploading the asset: {uploaded.describe()}")
        return Asset(asset_id, mime)

    def delete(self, asset: Asset) -> None:
        """Best effort: NVCF deletes it after 24 h anyway."""
        reply = self.api.call(
            "DELETE", f"{self.url}/{asset.id}", deadline=time.monotonic() + _DELETE_TIMEOUT_S
        )
        if reply.outcome is not ApiOutcome.OK:
            log.warning("deleting NVCF asset %s: %s", asset.id, reply.describe())

    def _upload_target(self, upload_url: str) -> PinnedUrl:
        """The presigned URL, checked like a client's: https, public addresses only (plain http
        and private addresses only on the assets API's own host, e.g. a local stand-in)."""
        try:
            parsed = parse_upload_url(upload_url, field="uploadUrl")
            own = self._own
            own_host = (parsed.scheme.lower(), parsed.host, parsed.port) == (
                own.scheme.lower(), own.host, own.port
            )
            if parsed.scheme.lower() != "https" and not own_host:
                raise AssetFailed(AssetResult.UPLOAD_FAILED, "the upload URL is not https")
            allowed = AllowedUrl(**vars(parsed), exact=own_host)
            return pin(allowed, resolve=self.resolve, field="uploadUrl")
        except GatewayError as exc:
            raise AssetFailed(AssetResult.UPLOAD_FAILED, exc.message) from None
