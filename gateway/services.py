"""What the app factory builds once per process and the use cases share."""

from __future__ import annotations

from dataclasses import dataclass

import urllib3

from gateway.limits import LimitsSource
from gateway.metrics import Metrics
from gateway.nvidia.deepfake import DeepfakeClient, deepfake_unavailable
from gateway.settings import Settings
from gateway.triton.client import TritonGateway
from gateway.upload.uploader import Uploader


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    http: urllib3.PoolManager
    triton: TritonGateway
    limits: LimitsSource
    uploader: Uploader
    deepfake: DeepfakeClient | None = None  # None without GATEWAY_NVIDIA_API_KEY

    def require_deepfake(self) -> DeepfakeClient:
        """The deepfake client, or the 400 a request asking for the check gets without one."""
        if self.deepfake is None:
            raise deepfake_unavailable()
        return self.deepfake

    def close(self) -> None:
        self.triton.close()
        if self.deepfake is not None:
            self.deepfake.close()
