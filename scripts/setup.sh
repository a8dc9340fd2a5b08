#!/usr/bin/env bash
# Installs and starts what mediafarm needs on a Debian/Ubuntu machine, idempotently:
# RabbitMQ and Redis (installed if missing, started if not answering), and a Python venv
# (.venv) with the real `celery` package for the interop tests and benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_updated=""
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 tries=${3:-120}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$name did not start listening on 127.0.0.1:$port"
  return 1
}

# --- build tools ------------------------------------------------------------------------
command -v cargo >/dev/null || { log "cargo not found: install Rust 1.88 or newer (rustup)"; exit 1; }
command -v cc >/dev/null || apt_install build-essential
command -v pkg-config >/dev/null || apt_install pkg-config

# --- Redis --------------------------------------------------------------------------------
# redis-server is needed even when Redis already runs: the fault tests restart a private one,
# and tests/tls.rs starts one with only a TLS port (Debian's redis-server is built with TLS).
command -v redis-server >/dev/null || apt_install redis-server
if ! port_open 6379; then
  log "starting Redis on 127.0.0.1:6379"
  mkdir -p var/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$PWD/var/redis" --logfile "$PWD/var/redis/redis.log"
  wait_port 6379 Redis
fi

# --- RabbitMQ -----------------------------------------------------------------------------
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ on 127.0.0.1:5672"
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    $SUDO systemctl start rabbitmq-server
  else
    $SUDO rabbitmq-server -detached
  fi
  wait_port 5672 RabbitMQ 240
  # The port opens before the broker accepts logins; wait until it has fully booted.
  $SUDO rabbitmqctl await_startup >/dev/null 2>&1 || sleep 5
fi

# --- per-component extras -------------------------------------------------------------------
# Each worker or deploy piece that needs more (Debian -dev packages, servers for its tests) keeps
# its own script here; they are sourced so they can use apt_install, port_open and wait_port.
for extra in scripts/setup.d/*.sh; do
  [ -e "$extra" ] || continue
  # shellcheck source=/dev/null
  . "$extra"
done

# --- Python with celery -------------------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || apt_install python3
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then apt_install python3-venv; fi
REQ=tests/py/requirements.txt
STAMP=.venv/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] \
   || ! .venv/bin/python -c 'import celery, redis' >/dev/null 2>&1; then
  log "installing into .venv: $(grep -v '^#' "$REQ" | xargs)"
  # Installed over an existing venv (pins win), so a changed list does not pull the venv away
  # from a test or benchmark that is using it.
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ"
  echo "$want" > "$STAMP"
fi
log "ready: RabbitMQ 127.0.0.1:5672, Redis 127.0.0.1:6379, $(.venv/bin/python -c 'import celery; print("celery", celery.__version__)') in .venv"
