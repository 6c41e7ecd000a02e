#!/usr/bin/env bash
# Runs the whole suite on this machine with `systemvm-core up`: core (SQLite), a console proxy and a
# storage VM as local processes, a local-directory image store, a demo VM under QEMU (a shell on
# its console: `systemvm-image demo`), and a demo
# image served on loopback; prints the API URL, the credentials file and the next steps (commands
# that work as they are in any new shell). Ctrl-C stops everything it started.
#
#   scripts/run.sh                               # data in ~/.local/share/systemvm-core, API on 127.0.0.1:8080
#   scripts/run.sh --listen 127.0.0.1:9080       # another API address
#   scripts/run.sh --store nfs://HOST/EXPORT     # an NFS image store instead of a local directory
#   scripts/run.sh --no-demo                     # no demo VM
#   DATA_DIR=/srv/core scripts/run.sh            # another data dir (the printed commands name it)
#
# The data dir is the one every systemvm-core command uses without --data-dir:
# $SYSTEMVM_CORE_DATA_DIR, else $XDG_DATA_HOME/systemvm-core, else ~/.local/share/systemvm-core.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh run
cargo build --release --locked -p systemvm-core -p console-proxy -p ssvm-agent -p systemvm-image --bins
target="${CARGO_TARGET_DIR:-$PWD/target}"
bin="$target/release/systemvm-core"
# The demo VM's guest: Debian's kernel and a busybox shell on its console (a few seconds, cached).
"$target/release/systemvm-image" demo --out "$target/systemvm-image" --cache "$target/systemvm-image-cache" >/dev/null
demo=(--demo-kernel "$target/systemvm-image/demo-vmlinuz" --demo-initrd "$target/systemvm-image/demo-initrd.img")
if [ -n "${DATA_DIR:-}" ]; then
  exec "$bin" up --data-dir "$DATA_DIR" "${demo[@]}" "$@"
fi
exec "$bin" up "${demo[@]}" "$@"
