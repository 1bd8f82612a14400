#!/usr/bin/env bash
# Builds the libFuzzer targets with coverage instrumentation on stable Rust (what
# `cargo fuzz build -s none` does) and runs each for SECONDS (default 20), starting from the seeds
# in fuzz/seeds. A crash (panic) fails the script and leaves the input in target/fuzz-artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
host=$(rustc -vV | sed -n 's/host: //p')
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build -q --release -p spiderpool-fuzz --target "$host" --target-dir target/fuzz
for t in fuzz_range fuzz_pool fuzz_annotations; do
  corpus=target/fuzz-corpus/$t
  mkdir -p "$corpus" target/fuzz-artifacts
  echo "-- fuzzing $t for ${secs}s"
  "target/fuzz/$host/release/$t" -max_total_time="$secs" -max_len=4096 \
    -artifact_prefix=target/fuzz-artifacts/ "$corpus" "fuzz/seeds/$t" 2>&1 | grep -E '^Done|ERROR|panicked' || true
  if ls target/fuzz-artifacts/crash-* >/dev/null 2>&1; then
    echo "!! $t crashed: see target/fuzz-artifacts" >&2
    exit 1
  fi
done
