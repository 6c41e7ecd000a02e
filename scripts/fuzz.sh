#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ with libFuzzer on the stable toolchain (coverage
# instrumentation through stable codegen flags; no sanitizer), SECONDS_EACH seconds each (60),
# or until RUNS_EACH executions when that is set. A crash stops the script with libFuzzer's status.
#   scripts/fuzz.sh [TARGET...]                    # default: all targets
#   RUNS_EACH=10000000 scripts/fuzz.sh api_params
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${SECONDS_EACH:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rfb_handshake ws_frames console_token image_inspect api_params agent_messages upload_request nbd_replies qcow2_tables vm_seed)
triple=$(rustc -vV | awk '/^host:/ {print $2}')
# With an explicit --target, these flags reach the fuzzed code but not build scripts.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  cargo build --release --locked --target "$triple" --target-dir ../target/fuzz
for t in "${targets[@]}"; do
  mkdir -p "../target/fuzz/corpus/$t"
  limit=(-max_total_time="$secs")
  [ -z "${RUNS_EACH:-}" ] || limit=(-runs="$RUNS_EACH")
  # api_params' work per input grows with its parameter count (sorting, encoding, HMACs): inputs
  # up to 512 bytes keep it fast; the 2,048-parameter cap is unit-tested.
  [ "$t" != api_params ] || limit+=(-max_len=512)
  echo "fuzz: $t ${limit[*]}" >&2
  "../target/fuzz/$triple/release/$t" "${limit[@]}" -rss_limit_mb=2048 "../target/fuzz/corpus/$t"
done
