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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nfs_port=$(free_port); mnt_port=$(free_port)
mkdir -p "$work/export"
cat > "$work/ganesha.conf" <<CONF
NFS_CORE_PARAM { Protocols = 3; NFS_Port = $nfs_port; MNT_Port = $mnt_port; Bind_Addr = 127.0.0.1;
  Enable_NLM = false; Enable_RQUOTA = false; mount_path_pseudo = true; }
NFS_KRB5 { Active_krb5 = false; }
EXPORT { Export_Id = 1; Path = $work/export; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash;
  SecType = sys; Protocols = 3; Transports = TCP; FSAL { Name = VFS; } }
CONF
python3 scripts/fake_rpcbind.py > "$work/rpcbind.log" 2>&1 & pids+=($!)
for _ in $(seq 200); do [ -S /run/rpcbind.sock ] && break; sleep 0.05; done
ganesha.nfsd -F -L "$work/ganesha.log" -f "$work/ganesha.conf" -p "$work/ganesha.pid" -N NIV_EVENT & pids+=($!)
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$mnt_port") 2>/dev/null && break; sleep 0.05; done

echo "bench-register: making a ${size_mib} MiB qcow2 of random data" >&2
head -c $(( size_mib << 20 )) /dev/urandom > "$work/noise.raw"
qemu-img convert -f raw -O qcow2 "$work/noise.raw" "$work/image.qcow2"
rm -f "$work/noise.raw"

target/release/register-bench --store "nfs://127.0.0.1:$nfs_port/export?mountport=$mnt_port" \
  --image "$work/image.qcow2" --runs "$runs" --json "$out/register.json"
echo "bench-register: results in $out/register.json" >&2
