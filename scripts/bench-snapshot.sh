#!/usr/bin/env bash
# Snapshot backup benchmark: a sparse SIZE_GIB (8) GiB qcow2 disk with ALLOCATED_MIB (1024) MiB
# written, then CHANGE_PCT (1) % changed after a dirty bitmap, exported by qemu-nbd (as libvirt's
# pull-mode backup does); the storage VM's full backup against qemu-img convert -O qcow2 of the
# same export into the same store (a local directory), and the incremental backup, RUNS (5)
# times each in one run (the peer first in every other run); medians.
#
#   scripts/bench-snapshot.sh
#   CHANGE_PCT=0.125 JSON=target/bench/snapshot/snapshot-small-change.json scripts/bench-snapshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench/snapshot
mkdir -p "$out"
scripts/deps.sh test
cargo build --release --locked -p snapshot-bench
target/release/snapshot-bench --size-gib "${SIZE_GIB:-8}" --allocated-mib "${ALLOCATED_MIB:-1024}" \
  --change-pct "${CHANGE_PCT:-1}" --runs "${RUNS:-5}" --json "${JSON:-$out/snapshot.json}"
echo "bench-snapshot: results in ${JSON:-$out/snapshot.json}" >&2
