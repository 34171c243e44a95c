# Sourced by deploy/run.sh and deploy/test.sh: a venv with relay installed, and a RabbitMQ
# that answers with the plugins relay needs. Safe to run again; it only does what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELAY_VENV:-$ROOT/.venv}"
AMQP_HOST="${RELAY_AMQP_HOST:-127.0.0.1}"
AMQP_PORT="${RELAY_AMQP_PORT:-5672}"

say() { echo "relay-setup: $*" >&2; }

ensure_venv() {  # $1: pip extras, e.g. "[test]" or ""
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        say "Python 3.11 or newer is needed as \$PYTHON or python3"; exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$1" 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c 'import relay' || { say "installing relay failed"; exit 1; }
}

apt_install() {  # $@: Debian packages; installs the missing ones as root with apt, else says how
    local missing=() package
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "missing ${missing[*]}: install with" \
            "sudo apt-get install -y --no-install-recommends ${missing[*]}"
        return 1
    fi
    say "installing ${missing[*]} (apt)"
    # --no-install-recommends: Debian's docker-compose would otherwise bring the Docker engine.
    local install=(apt-get install -y -q --no-install-recommends "${missing[@]}")
    export DEBIAN_FRONTEND=noninteractive
    "${install[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && "${install[@]}" >/dev/null; } \
        || { say "apt-get could not install ${missing[*]}"; return 1; }
}

broker_answers() {
    "$VENV/bin/python" - "$AMQP_HOST" "$AMQP_PORT" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

ensure_rabbitmq() {
    if [ -n "${RELAY_AMQP_URL:-}" ] && [ -z "${RELAY_AMQP_HOST:-}" ]; then
        say "using \$RELAY_AMQP_URL as it is"
        return
    fi
    if ! broker_answers; then
        if command -v rabbitmqctl >/dev/null && rabbitmqctl -q status >/dev/null 2>&1; then
            say "RabbitMQ node is up but its app is stopped: starting it"
            rabbitmqctl -q start_app
        else
            if ! command -v rabbitmq-server >/dev/null; then
                say "no RabbitMQ on $AMQP_HOST:$AMQP_PORT and rabbitmq-server is not installed" \
                    "(or set RELAY_AMQP_URL)"
                apt_install rabbitmq-server || exit 1
            fi
            if ! broker_answers; then  # the package's own service may have started it
                say "no RabbitMQ on $AMQP_HOST:$AMQP_PORT: starting a local one"
                rabbitmq-server -detached
            fi
        fi
        for _ in $(seq 1 120); do broker_answers && break; sleep 1; done
        broker_answers || { say "RabbitMQ did not come up within 120 s"; exit 1; }
    fi
    if command -v rabbitmq-plugins >/dev/null; then
        rabbitmq-plugins -q enable rabbitmq_management \
            >/dev/null || { say "could not enable RabbitMQ plugins"; exit 1; }
    fi
}

# The local node's clock, restarted if it lags the OS's by more than a second. Erlang (in its
# default no_time_warp mode) follows a jump of the OS clock only slowly, and a stream stamps its
# chunks with the node's clock: a read "since T" (relay replay, relay trace, the archive tests)
# then misses what was written after T. A new VM starts on the OS's clock.
ensure_broker_clock() {
    [ -n "${RELAY_AMQP_URL:-}" ] && [ -z "${RELAY_AMQP_HOST:-}" ] && return 0  # not ours
    command -v rabbitmqctl >/dev/null || return 0
    local lag
    lag=$(rabbitmqctl -q eval 'os:system_time(millisecond) - erlang:system_time(millisecond).' \
        2>/dev/null) || return 0
    case "$lag" in ''|*[!0-9-]*) return 0 ;; esac
    [ "${lag#-}" -le 1000 ] && return 0
    say "the RabbitMQ node's clock is ${lag} ms off the OS's: restarting it"
    rabbitmqctl -q stop
    rabbitmq-server -detached
    for _ in $(seq 1 120); do broker_answers && break; sleep 1; done
    broker_answers || { say "RabbitMQ did not come up within 120 s"; exit 1; }
    rabbitmqctl -q await_startup
}
