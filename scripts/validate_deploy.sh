#!/usr/bin/env bash
# Offline validation of deploy/ (Dockerfiles, compose, Grafana) and k8s/ (kustomize base and
# overlays, KEDA and Prometheus Operator objects included). There is no Docker engine or cluster
# on these machines: this is what keeps those files correct. scripts/test.sh runs it; the tools
# come from scripts/setup.d/deploy.sh (kubectl) and tests/py/requirements.txt (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MEDIAFARM_TEST_PYTHON:-$PWD/.venv/bin/python}
echo "== deploy validation (kustomize + schemas, compose, Dockerfiles, dashboards)"
exec "$PY" deploy/validate_deploy.py --tools "$PWD/var/deploy-tools" --hadolint "$(dirname "$PY")/hadolint" "$@"
