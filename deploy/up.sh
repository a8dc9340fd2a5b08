#!/usr/bin/env bash
# Brings up a local mediafarm on this machine and runs a real job through each worker:
# installs/starts RabbitMQ, Redis and PostgreSQL if needed, builds the release binaries, starts
# every worker in the background (logs in var/log, pids in var/run) and submits one job to each,
# the upload pipeline as a chain (image.transform → notify.webhook to a local receiver), and the
# avatar pipeline (image.transform → persist.write of the variants' URLs into PostgreSQL).
# Stop the farm with deploy/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

CONFIG=${MEDIAFARM_CONFIG:-deploy/mediafarm.example.toml}
# MEDIAFARM_PROFILE=debug runs the debug build (what scripts/test.sh has already built: its
# smoke test of this script then costs no build); release is what a user runs.
PROFILE=${MEDIAFARM_PROFILE:-release}
case "$PROFILE" in
  release) PROFILE_FLAG=--release ;;
  debug) PROFILE_FLAG= ;;
  *) echo "[up] MEDIAFARM_PROFILE=$PROFILE is not accepted: release or debug"; exit 2 ;;
esac
echo "[up] building $PROFILE binaries (a first release build takes a few minutes on 2 cores)"
# shellcheck disable=SC2086
cargo build $PROFILE_FLAG --locked -q -p mediafarm -p image-worker -p notify-worker -p snapshot-worker -p persist-worker --bin mediafarm --bin image-worker --bin notify-worker --bin snapshot-worker --bin persist-worker --example echo-worker
BIN=target/$PROFILE
mkdir -p var/run var/log

http_status() { # port path -> first line of the response, or nothing
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET %s HTTP/1.0\r\n\r\n' "$2" >&3 && head -1 <&3) 2>/dev/null || true
}

start_worker() { # name binary metrics-port
  local name=$1 bin=$2 port=$3 pidfile=var/run/$1.pid
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "[up] restarting $name"
    kill -TERM "$(cat "$pidfile")" && sleep 1
  fi
  nohup "$bin" --config "$CONFIG" --metrics-addr "127.0.0.1:$port" --loglevel info \
    >"var/log/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 100); do
    case "$(http_status "$port" /readyz)" in *" 200"*) echo "[up] $name ready (metrics on 127.0.0.1:$port)"; return 0;; esac
    kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "[up] $name exited:"; tail -20 "var/log/$name.log"; return 1; }
    sleep 0.2
  done
  echo "[up] $name did not become ready; see var/log/$name.log"; return 1
}

start_worker echo-worker "$BIN/examples/echo-worker" 9808
start_worker image-worker "$BIN/image-worker" 9809

echo "[up] echo.echo through echo-worker:"
"$BIN/mediafarm" --config "$CONFIG" submit echo.echo --json '{"hello": "mediafarm", "sleep_ms": 10}' --wait --timeout 30

echo "[up] image.transform through image-worker (an upload into 512, 128 and 64 px avatars):"
STORAGE_DIR=var/storage   # storage_url = file://./var/storage in the example settings
mkdir -p "$STORAGE_DIR/demo"
python3 deploy/demo_image.py "$STORAGE_DIR/demo/original.png"
"$BIN/mediafarm" --config "$CONFIG" submit image.transform --wait --timeout 60 --json '{
  "source": "demo/original.png",
  "outputs": [
    {"key": "demo/avatar-512.jpg", "width": 512, "height": 512, "fit": "cover", "format": "jpeg", "quality": 82},
    {"key": "demo/avatar-128.webp", "width": 128, "height": 128, "fit": "cover", "format": "webp"},
    {"key": "demo/avatar-64.png", "width": 64, "height": 64, "fit": "cover", "format": "png"}
  ]}'

# notify-worker: with no smtp_url and sms_provider = "outbox" (the example settings), email goes
# to var/outbox/email as .eml files and SMS to var/outbox/sms as JSON.
# The demo pipeline's webhook goes to a receiver on this machine (below), so this notify-worker
# may call plain http:// on loopback; a real deployment leaves both off.
MEDIAFARM_WEBHOOK_ALLOW_HTTP=true MEDIAFARM_WEBHOOK_ALLOW_PRIVATE=true \
  start_worker notify-worker "$BIN/notify-worker" 9811
echo "[up] notify.email and notify.sms through notify-worker (to the outboxes):"
"$BIN/mediafarm" --config "$CONFIG" submit notify.email --wait --timeout 30 --json '{
  "to": "张三 <zhang@example.com>", "subject": "欢迎 to mediafarm",
  "text": "Hello from notify-worker.", "html": "<p>Hello from <b>notify-worker</b>.</p>"}'
"$BIN/mediafarm" --config "$CONFIG" submit notify.sms --wait --timeout 30 --json '{
  "to": "+14155550123", "body": "Your mediafarm code is 123456"}'
echo "[up] outbox: $(ls -t var/outbox/email/*.eml | head -1), $(ls -t var/outbox/sms/*.json | head -1)"

# The upload pipeline as one workflow, as an app sends it (README, "Workflows"): a chain of
# image.transform (the variants stored) and notify.webhook, which posts the transform's result
# (every variant's key and URL) to the app: here deploy/demo_webhook.py, writing what it
# receives to var/outbox/webhook. --wait waits for the chain's last step and fails if any failed.
WEBHOOK_PORT=9813   # the workers hold 9808-9811, beat 9812
if [ -f var/run/demo-webhook.pid ] && kill -0 "$(cat var/run/demo-webhook.pid)" 2>/dev/null; then
  kill -TERM "$(cat var/run/demo-webhook.pid)" && sleep 0.5
fi
nohup python3 deploy/demo_webhook.py "$WEBHOOK_PORT" var/outbox/webhook >var/log/demo-webhook.log 2>&1 </dev/null &
echo $! >var/run/demo-webhook.pid
for _ in $(seq 50); do case "$(http_status "$WEBHOOK_PORT" /)" in *" 200"*) break;; esac
  kill -0 "$(cat var/run/demo-webhook.pid)" 2>/dev/null || { echo "[up] demo webhook receiver exited:"; tail -20 var/log/demo-webhook.log; exit 1; }
  sleep 0.2; done
echo "[up] the upload pipeline, image.transform → notify.webhook, as a chain (mediafarm submit --workflow):"
"$BIN/mediafarm" --config "$CONFIG" submit --workflow - --wait --timeout 60 <<EOF
{"chain": [
  {"task": "image.transform", "kwargs": {"source": "demo/original.png", "outputs": [
    {"key": "demo/upload-1024.webp", "width": 1024, "fit": "inside", "format": "webp"},
    {"key": "demo/upload-256.jpg", "width": 256, "height": 256, "fit": "cover", "format": "jpeg"}]}},
  {"task": "notify.webhook", "kwargs": {"url": "http://127.0.0.1:$WEBHOOK_PORT/hooks/upload"}}
]}
EOF
received=$(ls -t var/outbox/webhook/*.json | head -1)
grep -q '"demo/upload-256.jpg"' "$received" || { echo "[up] the webhook did not carry the variants: $received"; exit 1; }
echo "[up] the app's webhook received the variants' URLs: $received"

# persist-worker: write-behind into PostgreSQL (scripts/setup.sh makes sure one answers on
# 127.0.0.1:5432; PERSIST_DEMO_DATABASE_URL points the demo elsewhere). Its one table is
# declared here; the avatar pipeline writes the transform's variant URLs into the profile's row.
PERSIST_DB=${PERSIST_DEMO_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
psql "$PERSIST_DB" -q -v ON_ERROR_STOP=1 -c 'CREATE TABLE IF NOT EXISTS mediafarm_demo_profiles (
  user_id bigint PRIMARY KEY, avatar_url text, avatar_small_url text, version bigint NOT NULL)'
MEDIAFARM_PERSIST_DATABASE_URL="$PERSIST_DB" \
MEDIAFARM_PERSIST_TABLES='{"mediafarm_demo_profiles": {"key": ["user_id"], "version": "version",
  "columns": {"user_id": "int", "avatar_url": "text", "avatar_small_url": "text", "version": "int"}}}' \
  start_worker persist-worker "$BIN/persist-worker" 9814
echo "[up] the avatar pipeline, image.transform → persist.write into PostgreSQL, as a chain:"
version=$(date +%s%3N)
"$BIN/mediafarm" --config "$CONFIG" submit --workflow - --wait --timeout 60 <<EOF
{"chain": [
  {"task": "image.transform", "kwargs": {"source": "demo/original.png", "outputs": [
    {"key": "demo/avatar-42-256.webp", "width": 256, "height": 256, "fit": "cover", "format": "webp"},
    {"key": "demo/avatar-42-64.webp", "width": 64, "height": 64, "fit": "cover", "format": "webp"}]}},
  {"task": "persist.write", "kwargs": {"table": "mediafarm_demo_profiles", "key": {"user_id": 42},
    "version": $version, "from_parent": {"avatar_url": "/outputs/0/url", "avatar_small_url": "/outputs/1/url"}}}
]}
EOF
row=$(psql "$PERSIST_DB" -tA -c "SELECT avatar_url FROM mediafarm_demo_profiles WHERE user_id = 42 AND version = $version")
case "$row" in *demo/avatar-42-256.webp*) echo "[up] the profile row holds the variant's URL: $row";;
  *) echo "[up] the profile row does not hold the variant's URL (got: '$row')"; exit 1;; esac

# snapshot-worker: a generated local H.264 file as the stream (file:// sources are allowed only
# under source_allowed_roots, given to this worker alone); one frame at 2.5 s, then a session
# taking a frame every 2 s of the stream until the file ends.
mkdir -p var/media
[ -s var/media/demo.mp4 ] || ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=size=640x360:rate=30 \
  -t 10 -c:v libx264 -preset veryfast -g 30 -pix_fmt yuv420p var/media/demo.mp4
MEDIAFARM_SOURCE_ALLOWED_ROOTS="$PWD/var/media" start_worker snapshot-worker "$BIN/snapshot-worker" 9810
echo "[up] snapshot.capture and snapshot.watch through snapshot-worker (into $STORAGE_DIR/demo):"
"$BIN/mediafarm" --config "$CONFIG" submit snapshot.capture --wait --timeout 60 --json "{
  \"stream_url\": \"file://$PWD/var/media/demo.mp4\", \"at_s\": 2.5, \"key\": \"demo/frame-{time}.jpg\", \"max_width\": 320}"
"$BIN/mediafarm" --config "$CONFIG" submit snapshot.watch --wait --timeout 60 --json "{
  \"stream_id\": \"demo\", \"stream_url\": \"file://$PWD/var/media/demo.mp4\", \"interval_s\": 2,
  \"key\": \"demo/watch/{stream_id}-{seq}.jpg\"}"

# One beat (periodic jobs); a second one anywhere with the same settings makes it highly
# available (README, "mediafarm beat"). It publishes nothing until an entry is added.
if [ -f var/run/beat.pid ] && kill -0 "$(cat var/run/beat.pid)" 2>/dev/null; then
  kill -TERM "$(cat var/run/beat.pid)" && sleep 1
fi
# Its own metrics port: the workers above hold 9808-9811.
nohup "$BIN/mediafarm" --config "$CONFIG" beat --metrics-addr 127.0.0.1:9812 >var/log/beat.log 2>&1 </dev/null &
echo $! >var/run/beat.pid
for _ in $(seq 50); do grep -q "this beat is the leader now" var/log/beat.log && break
  kill -0 "$(cat var/run/beat.pid)" 2>/dev/null || { echo "[up] beat exited:"; tail -20 var/log/beat.log; exit 1; }
  sleep 0.2; done
echo "[up] beat running (var/log/beat.log, metrics on 127.0.0.1:9812); periodic jobs: $BIN/mediafarm --config $CONFIG schedule add NAME TASK --every 20s --json '{...}'"

echo "[up] the farm is running: logs in var/log, stop it with deploy/down.sh"
