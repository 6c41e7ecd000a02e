#!/usr/bin/env bash
# System VM image benchmark: the image's size; its build from cached packages and prebuilt agents
# (`systemvm-image build --force`); and, RUNS (3) times, a console proxy VM booted by core's
# `qemu` driver (TCG, VM_MEMORY MiB, default 256) from the QEMU process's start to the init
# starting the agent and to the agent's channel to core being up, and the QEMU process's RSS once
# the VM has idled IDLE (10) seconds. Medians; JSON in target/bench/image/image.json.
#
#   scripts/bench-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
mem=${VM_MEMORY:-256}
idle=${IDLE:-10}
out=target/bench/image
mkdir -p "$out"
scripts/deps.sh test >/dev/null
cargo build --locked --quiet -p systemvm-image -p systemvm-core
target/debug/systemvm-image build >/dev/null
agents=$(python3 -c 'import json; print(json.load(open("target/systemvm-image/manifest.json"))["agents"])')
image=$PWD/target/systemvm-image/systemvm.qcow2
size=$(stat -c %s "$image")

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

builds=()
for _ in $(seq "$runs"); do
  t=$(now)
  target/debug/systemvm-image build --force --agents "$agents" --out "$out/build" >/dev/null 2>&1
  builds+=("$(echo "$(now) - $t" | bc)")
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
starts=(); ups=(); rss=()
for _ in $(seq "$runs"); do
  data=$(mktemp -d)
  target/debug/systemvm-core serve --data-dir "$data" --listen "127.0.0.1:$(free_port)" \
    --agent-listen "127.0.0.1:$(free_port)" --driver qemu --vm-image "$image" --vm-memory "$mem" \
    >"$data/core.log" 2>&1 &
  core=$!
  pid=
  for _ in $(seq 600); do
    pid=$(pgrep -f "qemu-system-x86_64 .*$data" | head -1 || true)
    [ -n "$pid" ] && break
    sleep 0.05
  done
  [ -n "$pid" ] || { kill $core; cat "$data/core.log" >&2; echo "bench-image: no VM started" >&2; exit 1; }
  t0=$(now)
  log=$(ls -d "$data"/systemvms/*/)console.log
  started= up=
  for _ in $(seq 1200); do
    if [ -z "$started" ] && grep -q 'systemvm-init: .*agent .* started' "$log" 2>/dev/null; then started=$(now); fi
    if grep -q 'Agent channel up' "$log" 2>/dev/null; then up=$(now); break; fi
    sleep 0.05
  done
  [ -n "$up" ] || { kill $core; tail -20 "$log" >&2; echo "bench-image: the agent did not come up" >&2; exit 1; }
  starts+=("$(echo "$started - $t0" | bc)")
  ups+=("$(echo "$up - $t0" | bc)")
  sleep "$idle"
  rss+=("$(awk '/^VmRSS:/ {print $2 / 1024}' "/proc/$pid/status")")
  kill $core; wait $core 2>/dev/null || true
  pkill -f "qemu-system-x86_64 .*$data" || true
  rm -rf "$data"
done

b=$(printf '%s\n' "${builds[@]}" | median)
s=$(printf '%s\n' "${starts[@]}" | median)
u=$(printf '%s\n' "${ups[@]}" | median)
r=$(printf '%s\n' "${rss[@]}" | median)
cat >"$out/image.json" <<JSON
{"image_bytes": $size, "build_s": $b, "boot_to_agent_start_s": $s, "boot_to_agent_up_s": $u,
 "idle_qemu_rss_mib": $r, "vm_memory_mib": $mem, "runs": $runs,
 "build_runs": [$(IFS=,; echo "${builds[*]}")], "up_runs": [$(IFS=,; echo "${ups[*]}")]}
JSON
printf 'image %.1f MiB; build %.1f s; boot to agent start %.1f s, to agent Up %.1f s; idle QEMU RSS %.0f MiB\n' \
  "$(echo "$size / 1048576" | bc -l)" "$b" "$s" "$u" "$r"
echo "bench-image: results in $out/image.json" >&2
