"""Triton: the tensor contract (`contract`) and the gateway's client (`client`)."""

from gateway.triton.client import Generated, TritonGateway, TritonHealth

__all__ = ["Generated", "TritonGateway", "TritonHealth"]
