#!/usr/bin/env bash
# Runs every check CI runs: installs and starts nothing by hand first — the real components
# (QEMU, Chromium, noVNC, playwright-core) are installed here, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo test --workspace --locked
# Every fuzz target builds and runs a few seconds (a target that stops building or crashes at once
# fails the run); the long runs and their figures: docs/fuzzing.md.
SECONDS_EACH=3 scripts/fuzz.sh
