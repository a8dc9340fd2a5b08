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
# Bounded, so a hang fails the run with its output instead of holding CI until its own limit
# (each test binary also aborts itself after 15 minutes: tests/support's watchdog).
timeout --kill-after=30 3600 cargo test --workspace --locked -- --test-threads 4 2>&1 | tee var/test-output.log
# The README's first command, on the debug build just made: every demo job must succeed
# (`submit --wait` exits 1 on a failed job, and up.sh stops there); then the farm is stopped.
echo "== deploy/up.sh smoke test (debug build)"
smoke=0
MEDIAFARM_PROFILE=debug timeout --kill-after=30 900 deploy/up.sh > var/up-smoke.log 2>&1 || smoke=$?
deploy/down.sh >> var/up-smoke.log 2>&1 || true
if [ "$smoke" != 0 ]; then
  tail -40 var/up-smoke.log
  echo "deploy/up.sh failed (exit $smoke); the whole log is var/up-smoke.log"
else
  grep -E '^\[up\]' var/up-smoke.log | tail -3
fi
# One closing line for every test binary together (the smoke test counts as one).
awk -v smoke="$smoke" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { if (smoke == 0) p += 1; else f += 1; printf "%d passed, %d failed, %d skipped\n", p, f, s }' var/test-output.log
[ "$smoke" = 0 ]
