#!/usr/bin/env bash
# The test command: venv + package + test tools, RabbitMQ, then lint, types and the test suite.
source "$(dirname "$0")/setup.sh"
ensure_venv "[test,dev,examples,otel]"
ensure_rabbitmq
ensure_broker_clock
# nginx: tests/test_nginx.py balances two ingresses with it; docker-compose, prometheus
# (promtool) and kubectl validate deploy/ offline (tests/test_deploy.py). kubectl is Debian's
# kubernetes-client unless one is installed already (Kubernetes' own `kubectl` package puts the
# same file in place, and the two conflict).
apt_install nginx docker-compose prometheus || exit 1
# Chromium: tests/test_console_browser.py drives Debian's headless browser with Playwright (the
# `test` extra), which then downloads none of its own.
apt_install chromium chromium-driver || exit 1
command -v kubectl >/dev/null || apt_install kubernetes-client || exit 1
# Every tool the suite uses is installed now: a test that finds one missing fails, not skips
# (tests/support.py, missing_tool).
export RELAY_TEST_STRICT_TOOLS=1
cd "$ROOT"
# Each step on its own line: under `set -e` a failing step stops the command (in `a && b`
# it would not).
echo "== ruff"
"$VENV/bin/ruff" check relay tests examples
"$VENV/bin/ruff" format --check relay tests examples
echo "== mypy"
"$VENV/bin/mypy" --strict relay tests examples
echo "== pytest"
# The suite runs in a vhost of its own on the local broker, deleted afterwards, so that it
# neither sees nor leaves anything in a vhost other things use. Node-wide settings a test
# changes, it restores itself. With $RELAY_AMQP_URL set, the suite uses that instead.
# Without arguments, in two runs: the tests that leave the broker alone two at a time
# (pytest-xdist; each of its two processes in a vhost of its own, the suite's suffixed -gw0 and
# -gw1, tests/support.py), then the fault tests, which stop the broker, one at a time.
PARALLEL=()
if [ -z "${RELAY_AMQP_URL:-}" ]; then
    VHOST="relay-test-$(date +%s)-$$"
    VHOSTS=("$VHOST" "$VHOST-gw0" "$VHOST-gw1")
    for vhost in "${VHOSTS[@]}"; do
        rabbitmqctl -q add_vhost "$vhost"
        rabbitmqctl -q set_permissions -p "$vhost" guest ".*" ".*" ".*"
    done
    trap 'for vhost in "${VHOSTS[@]}"; do rabbitmqctl -q delete_vhost "$vhost"; done' EXIT
    export RELAY_AMQP_URL="amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/$VHOST"
    echo "(in vhost $VHOST)"
    PARALLEL=(-n 2)
fi
# examples/invoice_store is tested on PostgreSQL too where a server answers on 127.0.0.1:5432
# (this machine type runs one, trust auth); elsewhere those tests skip and say why.
if [ -z "${RELAY_TEST_POSTGRES_URL:-}" ] && command -v pg_isready >/dev/null \
    && pg_isready -q -h 127.0.0.1 -p 5432; then
    export RELAY_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:5432/postgres"
fi
if [ $# -gt 0 ]; then
    "$VENV/bin/pytest" "$@"
    exit 0
fi
"$VENV/bin/pytest" "${PARALLEL[@]}" -m "not fault" --durations=15
"$VENV/bin/pytest" -m fault --durations=15
