#!/usr/bin/env bash
# Template registration benchmark: a qcow2 of SIZE_MIB (default 1024) MiB registered over loopback
# HTTP into an nfs-ganesha store with SHA-256 verification, against each stage alone (HTTP download
# to nowhere, SHA-256 over the bytes, plain NFS writes) in the same run. Needs root (ganesha, apt).
#
#   scripts/bench-register.sh            # RUNS=3 SIZE_MIB=1024
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-3}
size_mib=${SIZE_MIB:-1024}
out=target/bench/register
mkdir -p "$out"

need=$(( size_mib * 4 + 512 ))

scripts/deps.sh test
cargo build --release --locked -p register-bench

source scripts/bench-ganesha.sh

echo "bench-register: making a ${size_mib} MiB qcow2 of random data" >&2
head -c $(( size_mib << 20 )) /dev/urandom > "$work/noise.raw"
qemu-img convert -f raw -O qcow2 "$work/noise.raw" "$work/image.qcow2"
rm -f "$work/noise.raw"

target/release/register-bench --store "$store" \
  --image "$work/image.qcow2" --runs "$runs" --json "$out/register.json"
echo "bench-register: results in $out/register.json" >&2
