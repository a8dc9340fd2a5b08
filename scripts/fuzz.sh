#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each, one after the other, seeded
# from the committed corpus (fixtures/fuzz/<target>/{seeds,corpus,crashes}) and the
# dictionaries (fuzz/dicts/). Not part of scripts/test.sh: CI replays the committed files as
# unit tests instead (see fixtures/fuzz/README.md), this finds new ones.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     # default: 600 s, every target
#
# Needs `cargo install cargo-fuzz --locked` and the nightly toolchain. FUZZ_SANITIZER picks
# the sanitizer (default `none`: the code under test is safe Rust; `address` is cargo-fuzz's
# default and runs about twice as slowly). What the fuzzer grows goes to fuzz/corpus/<target>/,
# crashes, timeouts and OOMs to fuzz/artifacts/<target>/, the log to var/fuzz/<target>.log
# (none of these committed). Ends with one line per target: time, executions, coverage and
# the artifacts written; exits 1 if any target left an artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  targets=(rtmp_stream message_frame message_json redis_envelope image_spec heif_items progressive_jpeg snapshot_args notify_args)
fi
sanitizer=${FUZZ_SANITIZER:-none}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
mkdir -p var/fuzz
echo "== cargo +nightly fuzz build -s $sanitizer"
nice cargo +nightly fuzz build -s "$sanitizer"
summary=()
found=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=()
  for sub in seeds corpus crashes; do
    [ -d "fixtures/fuzz/$t/$sub" ] && seeds+=("fixtures/fuzz/$t/$sub")
  done
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  echo "== $t: $secs s (log: var/fuzz/$t.log)"
  start=$(date +%s)
  # -fork=1 with -ignore_*: a crash is saved and the run goes on, so one bug does not end it.
  nice cargo +nightly fuzz run -s "$sanitizer" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    "${dict[@]}" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 > "var/fuzz/$t.log" 2>&1 || true
  took=$(( $(date +%s) - start ))
  last=$(grep -E '^#[0-9]+: cov: ' "var/fuzz/$t.log" | tail -1 || true)
  execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<< "$last")
  cov=$(sed -E 's/.* cov: ([0-9]+) ft: ([0-9]+) .*/\1 edges, \2 features/' <<< "$last")
  new=$(( $(find "fuzz/artifacts/$t" -type f | wc -l) - before ))
  [ "$new" -gt 0 ] && found=1
  summary+=("$t: ${took} s, ${execs:-?} executions, ${cov:-no status line}, $new new artifacts")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
[ "$found" = 0 ]
