"""What the app factory builds once per process and the views share."""

from __future__ import annotations

from dataclasses import dataclass

import urllib3

from gateway.deepfake import DeepfakeClient
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.storage import Uploader
from gateway.triton import TritonGateway


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    http: urllib3.PoolManager
    triton: TritonGateway
    uploader: Uploader
    deepfake: DeepfakeClient | None = None  # None without GATEWAY_NVIDIA_API_KEY
