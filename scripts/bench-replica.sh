#!/usr/bin/env bash
# S3 replication benchmark: a SIZE_MIB (2048) MiB file on an nfs-ganesha staging store replicated
# to s3s-fs by the storage VM's S3 client, against `rclone copyto` of the same file to the same
# server with the same part size (16 MiB), cutoff and 4 parts in flight, RUNS (3) times each in
# one run (the peer first in every other run); then the same to a single-node Swift against
# `swift upload --use-slo` (16 MiB segments, 4 segment threads); medians, and the replica's peak RSS.
#
#   scripts/bench-replica.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
size_mib=${SIZE_MIB:-2048}
out=target/bench/replica
mkdir -p "$out"
need=$(( size_mib * 3 + 512 ))
scripts/deps.sh test
command -v rclone >/dev/null || { sudo_cmd=(); [ "$(id -u)" = 0 ] || sudo_cmd=(sudo); "${sudo_cmd[@]}" apt-get install -y -qq rclone; }
cargo build --release --locked -p replica-bench
source scripts/bench-ganesha.sh
head -c $(( size_mib << 20 )) /dev/urandom > "$work/export/template.bin"
target/release/replica-bench --store "$store" --path template.bin --local "$work/export/template.bin" \
  --s3-dir "$work/s3" --runs "$runs" --json "$out/replica.json"
target/release/replica-bench --provider swift --store "$store" --path template.bin \
  --local "$work/export/template.bin" --s3-dir "$work/s3" --swift-dir "$work/swift" --runs "$runs" \
  --json "$out/replica-swift.json"
echo "bench-replica: results in $out/replica.json and $out/replica-swift.json" >&2
