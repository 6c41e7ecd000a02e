#!/usr/bin/env bash
# Runs the whole suite on this machine with `systemvm-core up`: core (SQLite), a console proxy and a
# storage VM as local processes, a local-directory image store, and a demo VM under QEMU; prints the
# API URL, the credentials file and the next steps. Ctrl-C stops everything it started.
#
#   scripts/run.sh                               # data in target/run/core, API on 127.0.0.1:8080
#   scripts/run.sh --listen 127.0.0.1:9080       # another API address
#   scripts/run.sh --store nfs://HOST/EXPORT     # an NFS image store instead of a local directory
#   scripts/run.sh --no-demo                     # no demo VM
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh run
cargo build --release --locked -p systemvm-core -p console-proxy -p ssvm-agent --bins
export PATH="$PWD/target/release:$PATH"
exec systemvm-core up --data-dir "${DATA_DIR:-$PWD/target/run/core}" "$@"
