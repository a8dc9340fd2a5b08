#!/usr/bin/env bash
# Offline validation of deploy/ (Dockerfiles, compose, Grafana) and k8s/ (kustomize base and
# overlays, KEDA and Prometheus Operator objects included). There is no Docker engine or cluster
# on these machines: this is what keeps those files correct. scripts/test.sh runs it after its
# build; the tools come from scripts/setup.d/deploy.sh (kubectl, dclint) and
# tests/py/requirements.txt (.venv). Settings values are checked by `mediafarm check-settings`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MEDIAFARM_TEST_PYTHON:-$PWD/.venv/bin/python}
BIN=target/debug/mediafarm
# Build the CLI only when it is missing or older than the crate (test.sh has just built it).
if [ ! -x "$BIN" ] || [ -n "$(find shared/src shared/Cargo.toml Cargo.lock -newer "$BIN" -print -quit)" ]; then
  echo "== building the mediafarm CLI for check-settings"
  cargo build -q --locked -p mediafarm --bin mediafarm
fi
echo "== deploy validation (kustomize + schemas, compose, Dockerfiles, dashboards, settings)"
exec "$PY" deploy/validate --tools "$PWD/var/deploy-tools" --hadolint "$(dirname "$PY")/hadolint" \
  --mediafarm "$PWD/$BIN" "$@"
