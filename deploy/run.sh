#!/usr/bin/env bash
# Run relay (ingress + worker in one process) on config/relay.toml, setting up what is missing.
source "$(dirname "$0")/setup.sh"
ensure_venv ""
ensure_rabbitmq
cd "$ROOT"
exec "$VENV/bin/relay" run "$@"
