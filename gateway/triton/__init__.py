"""Triton: the tensor contract (`contract`) and the gateway's client (`client`)."""

from gateway.triton.client import Generated, Readiness, TritonGateway

__all__ = ["Generated", "Readiness", "TritonGateway"]
