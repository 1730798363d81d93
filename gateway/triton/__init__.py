"""Triton: the tensor contract (`contract`) and the gateway's client (`client`).

Nothing is imported here: the settings read the model names from `contract` in gunicorn's
master, which must not load gRPC or prometheus_client before its workers fork."""
