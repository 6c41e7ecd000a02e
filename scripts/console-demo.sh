#!/usr/bin/env bash
# The console proxy alone (no core): a demo VM under QEMU, the proxy, and a console link to open.
#
#   scripts/console-demo.sh                                  # starts a demo VM under QEMU (VNC with a password)
#   scripts/console-demo.sh --vnc HOST:PORT [--password PW]  # a VNC server you name instead
#   LISTEN=0.0.0.0:8080 scripts/console-demo.sh ...          # listen elsewhere (default 127.0.0.1:8080)
#
# Ctrl-C stops everything it started. State (key file, demo VM) lives in target/run/.
set -euo pipefail
cd "$(dirname "$0")/.."

vnc="" name="" password="${CONSOLE_PROXY_VNC_PASSWORD:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --vnc) vnc=$2; shift 2 ;;
    --password) password=$2; shift 2 ;;
    *) echo "usage: scripts/console-demo.sh [--vnc HOST:PORT [--password PW]]" >&2; exit 2 ;;
  esac
done
listen=${LISTEN:-127.0.0.1:8080}

scripts/deps.sh run
cargo build --release --locked -p console-proxy
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/console-proxy"
state=target/run
mkdir -p "$state"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_port() { # host port what
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "run: $3 did not start on $1:$2" >&2; exit 1
}

if [ -z "$vnc" ]; then
  display=$(for d in $(seq 50 99); do (exec 3<>"/dev/tcp/127.0.0.1/$((5900 + d))") 2>/dev/null || { echo "$d"; break; }; done)
  password=$(head -c 6 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 8)
  printf '%s' "$password" > "$state/vnc.secret"; chmod 600 "$state/vnc.secret"
  qemu-system-x86_64 -accel tcg -m 128 -display none -net none -monitor none -serial none \
    -name demo-vm -object "secret,id=vncpw,file=$state/vnc.secret" \
    -vnc "127.0.0.1:$display,password-secret=vncpw" &
  pids+=($!)
  vnc="127.0.0.1:$((5900 + display))" name=demo-vm
  wait_port 127.0.0.1 $((5900 + display)) "the demo VM's VNC server"
  echo "run: demo VM (SeaBIOS screen) on VNC $vnc with a random password"
fi

host=${listen%:*}; [ "$host" = 0.0.0.0 ] && host=127.0.0.1
port=${listen##*:}

# Whether process $1 holds a socket listening on TCP port $2 (its inode in /proc/net/tcp{,6}
# among the process's open files): the proxy itself is serving, not some other program.
owns_port() { # pid port
  local hex inode
  hex=$(printf ':%04X' "$2")
  for inode in $(awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { print $10 }' \
      /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
    ls -l "/proc/$1/fd" 2>/dev/null | grep -q "socket:\[$inode\]" && return 0
  done
  return 1
}

if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  echo "run: $host:$port is already in use by another program; stop it or pick another address with LISTEN=HOST:PORT" >&2
  exit 1
fi
[ -f "$state/keys.json" ] || "$bin" keygen --out "$state/keys.json"
"$bin" serve --listen "$listen" --keys "$state/keys.json" &
proxy=$!
pids+=("$proxy")
# Ready once the proxy process itself listens on the port; it failing to start (address in use,
# a bad flag, a missing web root) ends the script with its error above, and no link is printed.
for _ in $(seq 1 200); do
  if ! kill -0 "$proxy" 2>/dev/null; then
    wait "$proxy" && rc=0 || rc=$?
    echo "run: console-proxy failed to start on $listen (exit status $rc); see its error above" >&2
    exit 1
  fi
  owns_port "$proxy" "$port" && break
  sleep 0.05
done
if ! owns_port "$proxy" "$port" || ! kill -0 "$proxy" 2>/dev/null; then
  echo "run: console-proxy did not start listening on $listen within 10 s" >&2
  exit 1
fi

url=$(CONSOLE_PROXY_VNC_PASSWORD="$password" "$bin" token --keys "$state/keys.json" --vnc "$vnc" \
  --vm-name "${name:-$vnc}" --ttl 600 --url "http://$host:$port")
cat <<TXT

Console proxy is serving on $listen. Open this link in a browser (it works once, for 10 minutes):

  $url

Another link: CONSOLE_PROXY_VNC_PASSWORD=… $bin token --keys $PWD/$state/keys.json --vnc $vnc --url http://$host:$port
Press Ctrl-C to stop.
TXT
wait "${pids[@]}"
