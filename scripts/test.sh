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
echo "== cargo test"
cargo test --workspace --locked -- --test-threads 4
