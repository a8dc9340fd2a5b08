#!/usr/bin/env bash
# Fault figures for issue 3: runs the process-level fault tests (kill -9 mid-batch, RabbitMQ
# stop_app/start_app mid-batch, Redis restart mid-batch, a retry outliving its worker) and prints
# the jobs lost and duplicated in each and the recovery times, as the tests measured them.
# Loopback only; the RabbitMQ test stops the machine's broker for about 3 s.
# Usage: bench/fault_figures.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1}
for round in $(seq "$rounds"); do
  echo "# round $round" >&2
  cargo test -q -p mediafarm-tests --test broker_and_redis_restarts -- --nocapture --test-threads 1 2>/dev/null \
    | grep -o 'FIGURE .*' || { echo "fault tests failed; run them without this script to see why" >&2; exit 1; }
done
