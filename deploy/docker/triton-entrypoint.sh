#!/bin/sh
# The Triton container: a serving copy of the repository with the instance counts of the
# TRITON_INSTANCES_* variables (set_instances.py), then tritonserver on it under the drain
# supervisor (drain.py, embedded/drain.py of the repository), which is PID 1 and so gets the
# container's SIGTERM: it unloads the ensembles, waits up to TRITON_DRAIN_TIMEOUT_S for the
# requests they hold, then stops tritonserver, which waits TRITON_EXIT_TIMEOUT_S more for
# direct calls. docker-compose.yml's stop_grace_period (Kubernetes:
# terminationGracePeriodSeconds) must exceed the two together. Arguments are passed on to
# tritonserver.
#
# Triton's HTTP listener is bound to the container's own loopback, after the arguments so that
# none can move it: the drain's key for the repository API is on tritonserver's command line,
# which users of the host can read, and only a listener they cannot reach keeps it useless to
# them. Everything from outside goes to gRPC (the gateway, Kubernetes' probes) and the metrics
# port (Prometheus); drain.py closes the APIs nobody uses on both protocols.
# docs/security.md, "Triton's APIs".
set -eu
here=$(dirname "$0")
source="${MODEL_REPOSITORY:-/models}"
serving="${TRITON_SERVING_REPOSITORY:-/tmp/imagegen-models}"
python3 "$here/set_instances.py" "$source" "$serving"
exec python3 "$here/drain.py" --drain-timeout="${TRITON_DRAIN_TIMEOUT_S:-130}" -- \
    tritonserver --model-repository="$serving" \
    --exit-timeout-secs="${TRITON_EXIT_TIMEOUT_S:-20}" "$@" --http-address=127.0.0.1
