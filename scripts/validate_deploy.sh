#!/usr/bin/env bash
# Offline validation of deploy/ (Dockerfiles, compose, Grafana) and k8s/ (kustomize base and
# overlays, KEDA and Prometheus Operator objects included). There is no Docker engine or cluster
# on these machines: this is what keeps those files correct. scripts/test.sh runs it after its
# build; the tools come from scripts/setup.d/deploy.sh (kubectl, dclint) and
# tests/py/requirements.txt (.venv). Settings are checked by the program that reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MEDIAFARM_TEST_PYTHON:-$PWD/.venv/bin/python}
DEBUG="${CARGO_TARGET_DIR:-$PWD/target}/debug"
# The checks ask each program for the settings it reads and run its own check (mediafarm
# check-settings, <worker> --check-settings), and read what each binary links. scripts/test.sh
# has just built them; run alone, build with test.sh's own command (the same features, so test.sh
# rebuilds nothing afterwards) when one is missing or older than the sources.
stale=""
for bin in mediafarm image-worker snapshot-worker notify-worker persist-worker; do
  if [ ! -x "$DEBUG/$bin" ] \
     || [ -n "$(find shared workers Cargo.lock -newer "$DEBUG/$bin" \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -print -quit)" ]; then
    stale=1
  fi
done
if [ -n "$stale" ]; then
  echo "== cargo build --workspace --all-targets --locked (binaries for the deploy checks)"
  cargo build -q --workspace --all-targets --locked
fi
echo "== deploy validation (kustomize + schemas, compose, Dockerfiles, dashboards, settings)"
exec "$PY" deploy/validate --tools "$PWD/var/deploy-tools" --hadolint "$(dirname "$PY")/hadolint" \
  --mediafarm "$DEBUG/mediafarm" "$@"
