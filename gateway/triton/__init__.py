"""Triton: the tensor contract (`contract`), GATEWAY_TRITON_URL's replicas (`target`,
`replicas`) and the gateway's client (`client`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.triton.client import Generated, TritonGateway, TritonHealth

__all__ = ["Generated", "TritonGateway", "TritonHealth"]


def __getattr__(name: str) -> Any:
    # Lazy, like the `gateway` package: the settings parse GATEWAY_TRITON_URL with
    # `gateway.triton.target` in gunicorn's master, which must not import gRPC before the
    # workers fork.
    if name in __all__:
        from gateway.triton import client

        return getattr(client, name)
    raise AttributeError(f"module 'gateway.triton' has no attribute {name!r}")
