#!/usr/bin/env bash
# The test command: venv + package + test tools, RabbitMQ, then lint, types and the test suite.
source "$(dirname "$0")/setup.sh"
ensure_venv "[test,dev]"
ensure_rabbitmq
# nginx: tests/test_nginx.py balances two ingresses with it; docker-compose and prometheus
# (promtool) validate deploy/ offline (tests/test_deploy.py).
apt_install nginx docker-compose prometheus || exit 1
cd "$ROOT"
# Each step on its own line: under `set -e` a failing step stops the command (in `a && b`
# it would not).
echo "== ruff"
"$VENV/bin/ruff" check relay tests
"$VENV/bin/ruff" format --check relay tests
echo "== mypy"
"$VENV/bin/mypy" --strict relay tests
echo "== pytest"
exec "$VENV/bin/pytest" "$@"
