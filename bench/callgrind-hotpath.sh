#!/usr/bin/env bash
# Instructions per frame of the vhost/virtio hot path, PVP-like and in process (issue 16):
# `vmq bench` VM -> VM at 64 B (two in-process virtio-net devices whose guest sides replay
# frames at each other, one worker), under callgrind. Only the worker thread is counted (the
# thread with the most instructions besides the main one; the in-process guests' ring work runs
# inline there); its total is divided by the frames the guests received over the whole run.
#
# Usage: bench/callgrind-hotpath.sh [--frame-len N] [--seconds S] [--top N]
#            [--vms N] [--queues N] [--path vm-to-vm|uplink-to-vm] [--mode vmq|switch] [--cache-sim]
# --cache-sim adds callgrind's cache simulation (L1 and last-level data misses per frame, of a
# simulated cache, so independent of the host's load): what the footprint of many VMs costs.
# The simulated caches are this host's per-core ones: 48 KiB L1 data, 4 MiB L2 as the last level
# (its 300 MiB "L3" is what the hypervisor reports, not a cache one core can count on).
# Environment: VMQ=path/to/vmq (default: cargo build --release -p vmq), OUT=callgrind output file.
# Needs valgrind (callgrind_annotate). No root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
len=64
seconds=4
top=25
vms=2
queues=8
path=vm-to-vm
mode=vmq
cache_sim=no
while [ $# -gt 0 ]; do
    case "$1" in
        --frame-len) len=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --top) top=$2; shift 2 ;;
        --vms) vms=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --path) path=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --cache-sim) cache_sim=yes; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "${VMQ:-}" ]; then
    (cd "$root" && cargo build -q --release -p vmq)
    VMQ="${CARGO_TARGET_DIR:-$root/target}/release/vmq"
fi
out=${OUT:-$(mktemp /tmp/callgrind-hotpath.XXXXXX)}
json=$(valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no --separate-threads=yes \
    --cache-sim="$cache_sim" --D1=49152,12,64 --LL=4194304,16,64 \
    "$VMQ" bench --seconds "$seconds" --vms "$vms" --queues "$queues" --workers 1 --frame-len "$len" \
    --mode "$mode" --path "$path" --no-tcp --json 2>/dev/null)
frames=$(printf '%s' "$json" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(r["delivered_total"])')
python3 - "$out" "$frames" "$top" <<'PY'
import glob, re, subprocess, sys
out, frames, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def event_totals(path):
    events, values = [], []
    for line in open(path, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        if line.startswith("totals:") or line.startswith("summary:"):
            values = [int(v) for v in line.split()[1:]]
    return dict(zip(events, values))
def totals(path):
    return event_totals(path).get("Ir", 0)
# One file a thread (OUT-01 is the main thread): the worker is the busiest of the others.
threads = sorted(p for p in glob.glob(out + "-*") if not p.endswith("-01"))
worker = max(threads, key=totals)
text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", "--show=Ir", worker],
                      capture_output=True, text=True, check=True).stdout
total = None
rows = []
for line in text.splitlines():
    m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+PROGRAM TOTALS", line)
    if m:
        total = int(m.group(1).replace(",", ""))
        continue
    m = re.match(r"\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.*)", line)
    if m and total is not None:
        rows.append((int(m.group(1).replace(",", "")), m.group(2)))
# callgrind_annotate lists a function once per source file its inlined code came from: add
# those up per function ("file.rs:name [binary]" -> "name").
by_function = {}
for ir, name in rows:
    name = re.sub(r"\s+\[[^\]]*\]$", "", name)
    name = re.sub(r"^[^:]*\.(rs|S|c|h):", "", name)
    by_function[name] = by_function.get(name, 0) + ir
rows = sorted(((ir, name) for name, ir in by_function.items()), reverse=True)
if not frames or total is None:
    sys.exit(f"no frames delivered or no totals (frames={frames})")
print(f"frames delivered: {frames}")
print(f"worker instructions per frame: {total / frames:.0f}")
ev = event_totals(worker)
if "D1mr" in ev:
    d1 = ev.get("D1mr", 0) + ev.get("D1mw", 0)
    ll = ev.get("DLmr", 0) + ev.get("DLmw", 0)
    print(f"worker data misses per frame (simulated): L1 {d1 / frames:.1f}, last level {ll / frames:.2f}")
print("self instructions per frame, by function:")
for ir, name in rows[:top]:
    print(f"{ir / frames:8.1f}  {name[:150]}")
PY
echo "callgrind output: $out-* (one file a thread)"
