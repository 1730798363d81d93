#!/bin/sh
# The tests' system tools: promtool and prometheus (Debian's `prometheus`, 2.42) for the
# alert rules, docker-compose (Debian's 1.29) to validate docker-compose.yml, and chromium (a
# real browser, headless) for the /docs page.
# `make test` runs this: it installs them with apt when they are missing and we are root.
# When it cannot, it says so and lets the tests run: those that need a tool fail naming it.
set -u

missing=""
for tool in promtool prometheus docker-compose chromium; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "deploy/install-tools.sh: missing:$missing; not root or no apt-get, so not installed." \
         "Install the Debian packages prometheus, docker-compose and chromium; until then the" \
         "tests that use them fail." >&2
    exit 0
fi

# The prometheus package would start a system Prometheus on :9090; the tests run their own.
# A policy-rc.d that refuses every start keeps it down (one already there is left alone).
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
status=0
echo "deploy/install-tools.sh: installing$missing with apt (first time: a minute or two)"
apt-get update -q && apt-get install -y -q --no-install-recommends prometheus docker-compose chromium \
    || status=$?
[ -z "$added_policy" ] || rm -f "$policy"
# Under systemd, units can start whatever policy-rc.d says.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus
fi
if [ "$status" != 0 ]; then
    echo "deploy/install-tools.sh: apt-get failed ($status); the deploy tests will fail." >&2
fi
exit 0
