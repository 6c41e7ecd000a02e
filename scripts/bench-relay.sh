#!/usr/bin/env bash
# Relay throughput benchmark (docs/benchmarks.md): full-screen Raw framebuffer updates from TigerVNC
# Xvnc, read by tools/rfb-bench three ways in one run, interleaved:
#   direct      tcp://  straight to Xvnc (VNC authentication by the client)
#   proxy       ws://   through console-proxy (token; the proxy authenticates to Xvnc)
#   websockify  ws://   through websockify 0.13 from PyPI (VNC authentication passed through)
# A first, unrecorded pass warms Xvnc up; each run then measures the three paths in rotating order.
# Prints median MB/s and fps per path and the ratios; writes them to target/bench/relay.json.
#
#   scripts/bench-relay.sh                   # 5 runs of 200 measured frames per path
#   RUNS=9 FRAMES=400 scripts/bench-relay.sh
#
# Knobs: RUNS (5), FRAMES (200), WARMUP (5), GEOMETRY (1920x1080), SKIP_BUILD=1 (no deps.sh, no build).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

runs=${RUNS:-5}
frames=${FRAMES:-200}
warmup=${WARMUP:-5}
geometry=${GEOMETRY:-1920x1080}
password=secret12

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  scripts/deps.sh bench
  cargo build --release -p rfb-bench -p console-proxy
fi
bench=target/release/rfb-bench
proxy=target/release/console-proxy
venv=target/bench-venv
for f in "$bench" "$proxy" "$venv/bin/websockify"; do
  [ -x "$f" ] || { echo "bench-relay: $f missing (run without SKIP_BUILD=1)" >&2; exit 1; }
done
command -v Xvnc >/dev/null || { echo "bench-relay: Xvnc missing (scripts/deps.sh bench)" >&2; exit 1; }

mkdir -p target/bench
dir=$(mktemp -d "$here/target/bench/run.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" = 0 ]; then
    rm -rf "$dir"
  else
    echo "bench-relay: failed; logs and keys kept in $dir" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# TigerVNC password file: the password, zero-padded to 8 bytes, DES-ECB with TigerVNC's fixed key.
if command -v vncpasswd >/dev/null; then
  printf '%s\n' "$password" | vncpasswd -f >"$dir/passwd"
else
  python3 - "$password" "$dir/passwd" <<'EOF'
import sys
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
key = bytes.fromhex("E84AD660C4721AE0") * 3  # K1 = K2 = K3: single DES
enc = Cipher(TripleDES(key), modes.ECB()).encryptor()
open(sys.argv[2], "wb").write(enc.update(sys.argv[1].encode().ljust(8, b"\0")[:8]) + enc.finalize())
EOF
fi
chmod 600 "$dir/passwd"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p=$1
  while port_open "$p"; do p=$((p + 1)); done
  echo "$p"
}
# Polls until PORT accepts connections; fails if PID exits first or after 15 s.
wait_port() {
  local port=$1 pid=$2 name=$3 log=$4 i
  for ((i = 0; i < 300; i++)); do
    port_open "$port" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "bench-relay: $name exited; its log:" >&2
      tail -n 30 "$log" >&2
      exit 1
    fi
    sleep 0.05
  done
  echo "bench-relay: $name did not listen on $port; its log:" >&2
  tail -n 30 "$log" >&2
  exit 1
}

display=20
while [ -e "/tmp/.X$display-lock" ] || [ -e "/tmp/.X11-unix/X$display" ]; do display=$((display + 1)); done
vnc_port=$(free_port 15900)
Xvnc ":$display" -geometry "$geometry" -depth 24 -rfbport "$vnc_port" -localhost -interface 127.0.0.1 \
  -SecurityTypes VncAuth -PasswordFile "$dir/passwd" -BlacklistThreshold 1000000 -AlwaysShared \
  -nolisten tcp >"$dir/xvnc.log" 2>&1 &
xvnc_pid=$!
pids+=("$xvnc_pid")
wait_port "$vnc_port" "$xvnc_pid" Xvnc "$dir/xvnc.log"

"$proxy" keygen --out "$dir/keys.json"
proxy_port=$(free_port 18080)
"$proxy" serve --listen "127.0.0.1:$proxy_port" --keys "$dir/keys.json" 2>"$dir/proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")

ws_port=$(free_port 16080)
"$venv/bin/websockify" "127.0.0.1:$ws_port" "127.0.0.1:$vnc_port" >"$dir/websockify.log" 2>&1 &
ws_pid=$!
pids+=("$ws_pid")

wait_port "$proxy_port" "$proxy_pid" console-proxy "$dir/proxy.log"
wait_port "$ws_port" "$ws_pid" websockify "$dir/websockify.log"

xvnc_version=$( (Xvnc -version 2>&1 || true) | grep -m1 -o 'TigerVNC [0-9.]*' || true)
xvnc_version=${xvnc_version:-unknown}
ws_version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("websockify"))')
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
cpu_model=${cpu_model:-unknown}
echo "bench-relay: Xvnc $xvnc_version :$display on $vnc_port, console-proxy on $proxy_port," \
  "websockify $ws_version on $ws_port; $runs runs x $frames frames ($warmup warm-up) at $geometry" >&2

results=$dir/results.jsonl
: >"$results"
measure() {
  local run=$1 path=$2 url out
  local args=(--frames "$frames" --warmup "$warmup" --json --cpu-pid "xvnc=$xvnc_pid")
  case $path in
    direct)
      url="tcp://127.0.0.1:$vnc_port"
      args+=(--password "$password")
      ;;
    websockify)
      url="ws://127.0.0.1:$ws_port/"
      args+=(--password "$password" --cpu-pid "relay=$ws_pid")
      ;;
    proxy)
      # Tokens are one-time: a new one for every connection.
      local token
      token=$(CONSOLE_PROXY_VNC_PASSWORD=$password "$proxy" token --keys "$dir/keys.json" \
        --vnc "127.0.0.1:$vnc_port" --ttl 600)
      url="ws://127.0.0.1:$proxy_port/websockify?token=$token"
      args+=(--cpu-pid "relay=$proxy_pid")
      ;;
  esac
  if ! out=$("$bench" "$url" "${args[@]}"); then
    echo "bench-relay: $path failed in run $run" >&2
    [ "$path" != proxy ] || tail -n 20 "$dir/proxy.log" >&2
    exit 1
  fi
  [ "$run" != 0 ] || return 0
  printf '{"run":%d,"path":"%s","result":%s}\n' "$run" "$path" "$out" >>"$results"
  printf '  run %d %-10s %s\n' "$run" "$path" "$out" >&2
}

paths=(direct proxy websockify)
# Run 0 is not recorded: the first sessions after Xvnc starts are slower (buffers growing, caches cold).
for ((run = 0; run <= runs; run++)); do
  # Rotate the order every run so drift and warm-up effects fall on all paths alike.
  for ((i = 0; i < 3; i++)); do
    measure "$run" "${paths[$(((run + i) % 3))]}"
  done
done

"$venv/bin/python" - "$results" target/bench/relay.json "$(nproc)" "$cpu_model" "$(uname -r)" \
  "$xvnc_version" "$ws_version" "$geometry" "$frames" "$warmup" <<'EOF'
import datetime, json, statistics, sys

results, out, nproc, cpu_model, kernel, xvnc, wsv, geometry, frames, warmup = sys.argv[1:]
rows = [json.loads(l) for l in open(results)]
paths = ["direct", "proxy", "websockify"]
names = {"direct": "direct TCP", "proxy": "console-proxy", "websockify": "websockify " + wsv}
med = statistics.median

def cpu(r, k):
    return r["result"]["cpu"].get(k, 0.0)

def other(r):
    # Busy cores on the whole machine not spent in the client, Xvnc or the relay (other load).
    c = r["result"]["cpu"]
    return c.get("host", 0.0) - c["client"] - c["xvnc"] - c.get("relay", 0.0)

summary = {}
for p in paths:
    rs = [r for r in rows if r["path"] == p]
    summary[p] = {
        "mbps": med(r["result"]["mbps"] for r in rs),
        "fps": med(r["result"]["fps"] for r in rs),
        "mbps_min": min(r["result"]["mbps"] for r in rs),
        "mbps_max": max(r["result"]["mbps"] for r in rs),
        "cpu": {k: round(med(cpu(r, k) for r in rs), 3) for k in ["client", "xvnc", "relay", "host"]},
        "other_load": round(med(other(r) for r in rs), 3),
    }
ratio = lambda a, b: summary[a]["mbps"] / summary[b]["mbps"]
ratios = {
    "proxy_direct": round(ratio("proxy", "direct"), 3),
    "proxy_websockify": round(ratio("proxy", "websockify"), 3),
    "websockify_direct": round(ratio("websockify", "direct"), 3),
}
by_run = {}
for r in rows:
    by_run.setdefault(r["run"], {})[r["path"]] = r["result"]["mbps"]
paired = {
    "proxy_direct": round(med(v["proxy"] / v["direct"] for v in by_run.values()), 3),
    "proxy_websockify": round(med(v["proxy"] / v["websockify"] for v in by_run.values()), 3),
    "websockify_direct": round(med(v["websockify"] / v["direct"] for v in by_run.values()), 3),
}
disturbed = [r for r in rows if other(r) > 0.25]
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {"nproc": int(nproc), "cpu_model": cpu_model, "kernel": kernel},
    "software": {"xvnc": xvnc, "websockify": wsv},
    "geometry": geometry, "frames": int(frames), "warmup": int(warmup), "runs": len(by_run),
    "median": summary, "ratios": ratios, "paired_ratio_medians": paired,
    "target": {"proxy_direct_min": 0.9, "met": ratios["proxy_direct"] >= 0.9},
    "disturbed_measurements": len(disturbed),
    "measurements": rows,
}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")

print(f"\nRelay throughput: {geometry} Raw, non-incremental full updates; median of {len(by_run)} runs "
      f"x {frames} frames")
print(f"{report['date']}, {nproc} CPUs ({cpu_model}), Linux {kernel}, {xvnc}")
print("CPU: median cores busy during the measured window; other = whole machine minus the three")
print(f"{'path':<18}{'MB/s':>7}{'min-max':>12}{'fps':>8}{'client':>8}{'xvnc':>6}{'relay':>6}{'other':>6}")
for p in paths:
    s = summary[p]
    span = f"{s['mbps_min']:.0f}-{s['mbps_max']:.0f}"
    relay = f"{s['cpu']['relay']:.2f}" if p != "direct" else "-"
    print(f"{names[p]:<18}{s['mbps']:>7.0f}{span:>12}{s['fps']:>8.1f}{s['cpu']['client']:>8.2f}"
          f"{s['cpu']['xvnc']:>6.2f}{relay:>6}{s['other_load']:>6.2f}")
print(f"proxy/direct      {ratios['proxy_direct']:.2f}  (target >= 0.90: {'met' if report['target']['met'] else 'NOT met'}; "
      f"median of per-run ratios {paired['proxy_direct']:.2f})")
print(f"proxy/websockify  {ratios['proxy_websockify']:.2f}  (per-run {paired['proxy_websockify']:.2f})")
print(f"websockify/direct {ratios['websockify_direct']:.2f}  (per-run {paired['websockify_direct']:.2f})")
if disturbed:
    print(f"note: {len(disturbed)} of {len(rows)} measurements had more than 0.25 cores busy outside the three "
          f"processes (max {max(other(r) for r in disturbed):.2f}: other processes or kernel softirq threads)")
print(f"written to {out}")
EOF
