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
free=$(df -Pm target | awk 'NR==2 {print $4}')
if [ "$free" -lt "$need" ]; then
  echo "bench-register: needs ~${need} MiB free in target/, has ${free} MiB" >&2; exit 1
fi

scripts/deps.sh test
cargo build --release --locked -p register-bench

work=$(mktemp -d "$PWD/$out/run.XXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

source scripts/bench-ganesha.sh

echo "bench-register: making a ${size_mib} MiB qcow2 of random data" >&2
head -c $(( size_mib << 20 )) /dev/urandom > "$work/noise.raw"
qemu-img convert -f raw -O qcow2 "$work/noise.raw" "$work/image.qcow2"
rm -f "$work/noise.raw"

target/release/register-bench --store "$store" \
  --image "$work/image.qcow2" --runs "$runs" --json "$out/register.json"
echo "bench-register: results in $out/register.json" >&2
