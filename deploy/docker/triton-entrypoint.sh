#!/bin/sh
# The Triton container: a serving copy of the repository with the instance counts of the
# TRITON_INSTANCES_* variables (set_instances.py), then tritonserver on it under the drain
# supervisor (drain.py, embedded/drain.py of the repository), which is PID 1 and so gets the
# container's SIGTERM: it unloads the ensembles, waits up to TRITON_DRAIN_TIMEOUT_S for the
# requests they hold, then stops tritonserver, which waits TRITON_EXIT_TIMEOUT_S more for
# direct calls. docker-compose.yml's stop_grace_period (Kubernetes:
# terminationGracePeriodSeconds) must exceed the two together. Arguments are passed on to
# tritonserver.
set -eu
source="${MODEL_REPOSITORY:-/models}"
serving=/tmp/imagegen-models
python3 /opt/imagegen/set_instances.py "$source" "$serving"
exec python3 /opt/imagegen/drain.py --drain-timeout="${TRITON_DRAIN_TIMEOUT_S:-130}" -- \
    tritonserver --model-repository="$serving" \
    --exit-timeout-secs="${TRITON_EXIT_TIMEOUT_S:-20}" "$@"
