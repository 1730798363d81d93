#!/bin/sh
# The gateway image's entrypoint, for the gateway and the job worker alike. Two settings are
# secrets that the gateway reads from its environment only: GATEWAY_REDIS_URL (it carries the
# Redis password) and GATEWAY_WEBHOOK_SECRETS. They come as files instead, so that no value sits
# in the container's definition (`docker inspect`, a Pod spec) or on a command line; each file
# present becomes the variable in the environment of the command exec'd below, and nowhere else:
#
#   /run/secrets/redis_url        GATEWAY_REDIS_URL        redis://:<password>@<host>:6379/0
#   /run/secrets/webhook_secrets  GATEWAY_WEBHOOK_SECRETS  whsec_..., comma-separated
#
# compose mounts its secrets there; on Kubernetes a projected volume of the Secrets
# imagegen-redis and imagegen-webhooks. With no file, the environment stays as it is. A file that
# cannot be read stops the container before its command starts.
set -e
if [ -e /run/secrets/redis_url ]; then
    GATEWAY_REDIS_URL="$(cat /run/secrets/redis_url)"
    export GATEWAY_REDIS_URL
fi
if [ -e /run/secrets/webhook_secrets ]; then
    GATEWAY_WEBHOOK_SECRETS="$(cat /run/secrets/webhook_secrets)"
    export GATEWAY_WEBHOOK_SECRETS
fi
exec "$@"
