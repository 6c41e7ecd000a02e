#!/usr/bin/env bash
# Upload benchmark: SIZE_MIB (default 2048) MiB uploaded over loopback into an nfs-ganesha store
# through the storage VM's transfer server (CloudStack's one-shot multipart POST, and tus in
# CHUNK_MIB (8) MiB PATCHes) against a plain HTTP POST to a minimal sink writing the same store,
# in one run, with the peak RSS of each. Needs root (ganesha, apt).
#
#   scripts/bench-upload.sh            # RUNS=3 SIZE_MIB=2048 CHUNK_MIB=8
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-3}
size_mib=${SIZE_MIB:-2048}
chunk_mib=${CHUNK_MIB:-8}
out=target/bench/upload
mkdir -p "$out"

need=$(( size_mib * 2 + 512 ))

scripts/deps.sh test
cargo build --release --locked -p upload-bench

source scripts/bench-ganesha.sh

target/release/upload-bench --store "$store" --size-mib "$size_mib" --chunk-mib "$chunk_mib" \
  --runs "$runs" --json "$out/upload.json"
echo "bench-upload: results in $out/upload.json" >&2
