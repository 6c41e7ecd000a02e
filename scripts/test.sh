#!/usr/bin/env bash
# Runs every check CI runs: installs and starts nothing by hand first — the real components
# (QEMU, Chromium, noVNC, playwright-core) are installed here, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's time goes to stderr, so a slow step shows in CI's log.
step() {
  local t=$SECONDS
  "$@"
  echo "test.sh: $(( SECONDS - t )) s for: $*" >&2
}
step scripts/deps.sh test
step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" step cargo doc --workspace --no-deps --locked --quiet
# The system VM image the appliance tests boot: its agents built static (musl, profile `image`),
# the image rebuilt only when an input changed (target/systemvm-image/manifest.json).
step cargo build --locked --quiet -p systemvm-image
step target/debug/systemvm-image build
step target/debug/systemvm-image demo
# Four tests at a time per binary on two cores: most end-to-end tests wait on servers and VMs
# rather than compute (the TCG guests take turns on their own lock); 358 s instead of 428 s.
RUST_TEST_THREADS=${RUST_TEST_THREADS:-4} step cargo test --workspace --locked
# Every fuzz target builds and runs a few seconds (a target that stops building or crashes at once
# fails the run); the long runs and their figures: docs/fuzzing.md.
SECONDS_EACH=3 step scripts/fuzz.sh
echo "test.sh: $SECONDS s in all" >&2
