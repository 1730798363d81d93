#!/bin/sh
# The Triton container: a serving copy of the repository with the instance counts of the
# TRITON_INSTANCES_* variables (set_instances.py), then tritonserver on it. Arguments are
# passed on to tritonserver.
set -eu
source="${MODEL_REPOSITORY:-/models}"
serving=/tmp/imagegen-models
python3 /opt/imagegen/set_instances.py "$source" "$serving"
exec tritonserver --model-repository="$serving" "$@"
