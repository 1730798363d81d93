"""Programs that drive the real stack for load runs and measurements.

`python -m harness.load` (concurrent clients with storage faults, Triton crashes, replicas) and
`python -m harness.scaling_signal` (the autoscaling signal on a real Triton and Prometheus) run
here, with what they are built from: a flaky storage front, Triton replicas behind a loopback
DNS name, the Kubernetes rendering and checks, and where the tools they run come from. The
thin pytest wrappers in tests/ run shortened versions of them in `make test`.
"""
