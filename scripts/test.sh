#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, and the end-to-end tests against the real
# RabbitMQ and Redis on 127.0.0.1 and the real Python celery package. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export MEDIAFARM_TEST_PYTHON="$PWD/.venv/bin/python"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build (binaries and examples the process tests start)"
cargo build --workspace --all-targets --locked
# Offline checks of deploy/ and k8s/ (no Docker engine or cluster here); uses the binaries just built.
scripts/validate_deploy.sh
echo "== cargo test"
mkdir -p var
cargo test --workspace --locked -- --test-threads 4 2>&1 | tee var/test-output.log
# One closing line for every test binary together.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' var/test-output.log
