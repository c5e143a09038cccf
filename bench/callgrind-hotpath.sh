#!/usr/bin/env bash
# Instructions per frame of the vhost/virtio hot path, PVP-like and in process (issue 16):
# `vmq bench` VM -> VM at 64 B (two in-process virtio-net devices whose guest sides replay
# frames at each other, one worker), under callgrind. Only the worker thread is counted (the
# thread with the most instructions besides the main one; the in-process guests' ring work runs
# inline there); its total is divided by the frames the guests received over the whole run.
#
# Usage: bench/callgrind-hotpath.sh [--frame-len N] [--seconds S] [--top N]
# Environment: VMQ=path/to/vmq (default: cargo build --release -p vmq), OUT=callgrind output file.
# Needs valgrind (callgrind_annotate). No root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
len=64
seconds=4
top=25
while [ $# -gt 0 ]; do
    case "$1" in
        --frame-len) len=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --top) top=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "${VMQ:-}" ]; then
    (cd "$root" && cargo build -q --release -p vmq)
    VMQ="${CARGO_TARGET_DIR:-$root/target}/release/vmq"
fi
out=${OUT:-$(mktemp /tmp/callgrind-hotpath.XXXXXX)}
json=$(valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no --separate-threads=yes \
    "$VMQ" bench --seconds "$seconds" --vms 2 --workers 1 --frame-len "$len" --mode vmq \
    --path vm-to-vm --no-tcp --json 2>/dev/null)
frames=$(printf '%s' "$json" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(r["delivered_total"])')
python3 - "$out" "$frames" "$top" <<'PY'
import glob, re, subprocess, sys
out, frames, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def totals(path):
    for line in open(path, errors="replace"):
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    return 0
# One file a thread (OUT-01 is the main thread): the worker is the busiest of the others.
threads = sorted(p for p in glob.glob(out + "-*") if not p.endswith("-01"))
worker = max(threads, key=totals)
text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", worker],
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
print("self instructions per frame, by function:")
for ir, name in rows[:top]:
    print(f"{ir / frames:8.1f}  {name[:150]}")
PY
echo "callgrind output: $out-* (one file a thread)"
