#!/usr/bin/env bash
# Stops the workers deploy/up.sh started (SIGTERM: running jobs finish, the rest go back).
set -uo pipefail
cd "$(dirname "$0")/.."
for pidfile in var/run/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile"); name=$(basename "$pidfile" .pid)
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    echo "[down] stopped $name"
  fi
  rm -f "$pidfile"
done
