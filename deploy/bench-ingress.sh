#!/usr/bin/env bash
# Ingress throughput on your hardware, against baselines measured in the same run (a plain
# aiohttp relay, an HTTP ceiling, the broker's own ceiling), then latency at a held rate and
# through a broker outage: tests/bench/ingress.py (its docstring says what each figure is).
# Usage: deploy/bench-ingress.sh [--rounds 3] [--seconds 10] [--outage 60] [--no-write]
# Installs wrk when missing. Talks only to 127.0.0.1; stops by itself.
source "$(dirname "$0")/setup.sh"
ensure_venv "[test]"
ensure_rabbitmq
apt_install wrk || exit 1
cd "$ROOT"
exec "$VENV/bin/python" -m tests.bench.ingress "$@"
