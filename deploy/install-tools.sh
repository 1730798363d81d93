#!/bin/sh
# System tools from Debian's packages: promtool and prometheus (`prometheus`, 2.42) for the
# alert rules, docker-compose (1.29) to validate docker-compose.yml, chromium (a real browser,
# headless) for the /docs page, and nginx (`nginx-light`), the gateway's front door in
# `make serve` and in the tests, and Redis (`redis-server`), the jobs' store and queue.
# `make test` runs this for all of them, `make serve` for nginx only (`sh deploy/install-tools.sh
# nginx`): it installs what is missing with apt when we are root. When it cannot, it says so and
# goes on: whatever needs a missing tool fails naming it.
set -u

package_of() {
    case "$1" in
        promtool | prometheus) echo prometheus ;;
        nginx) echo nginx-light ;;
        redis-server) echo redis-server ;;
        *) echo "$1" ;;
    esac
}

found() {
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

missing=""
packages=""
for tool in ${*:-promtool prometheus docker-compose chromium nginx redis-server}; do
    found "$tool" && continue
    missing="$missing $tool"
    package=$(package_of "$tool")
    case " $packages " in
        *" $package "*) ;;
        *) packages="$packages $package" ;;
    esac
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "deploy/install-tools.sh: missing:$missing; not root or no apt-get, so not installed." \
         "Install the Debian packages$packages (docs/getting-started.md); until then what" \
         "uses them fails." >&2
    exit 0
fi

# The prometheus and nginx packages would start system services (:9090, :80); the project runs
# its own. A policy-rc.d that refuses every start keeps them down (one already there is left).
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
status=0
echo "deploy/install-tools.sh: installing$packages with apt (first time: a minute or two)"
# shellcheck disable=SC2086  # one word per package
apt-get update -q && apt-get install -y -q --no-install-recommends $packages || status=$?
[ -z "$added_policy" ] || rm -f "$policy"
# Under systemd, units can start whatever policy-rc.d says.
if command -v systemctl >/dev/null 2>&1; then
    for service in prometheus nginx redis-server; do
        if systemctl is-active --quiet "$service" 2>/dev/null; then
            systemctl disable --now "$service"
        fi
    done
fi
if [ "$status" != 0 ]; then
    echo "deploy/install-tools.sh: apt-get failed ($status); what needs$missing will fail." >&2
fi
exit 0
