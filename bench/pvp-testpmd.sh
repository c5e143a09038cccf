#!/usr/bin/env bash
# vhost-user PVP loopback: vmq vs dpdk-testpmd as the switch (issue #4 targets).
#
# "The VM" is one dpdk-testpmd with two virtio-user ports (a userspace virtio-net driver that
# attaches to a vhost-user socket as a guest would) on CPU 0, forwarding port 0 -> 1 and 1 -> 0
# and primed with `start tx_first 32`; the switch connects the two ports back, on CPU 1:
#
#   VM port 0 --> switch port a --> switch port b --> VM port 1 --+
#       ^                                                          | (the VM forwards)
#       +------ switch port a <-- switch port b <-- VM port 1 <---+
#
# The switch is (a) vmq with one worker, pinned to CPU 1 with taskset, two vhost-user ports in
# one VLAN whose MACs are the VM ports' (frames are switched by MAC, port to port), and (b)
# dpdk-testpmd with two net_vhost ports in io mode (port to port, no lookup) on CPU 1. The rate
# is what the VM receives (`show port stats all`, RX-packets of both ports): frames that made
# the whole round, both directions summed; with vmq, `vmq ctl stats` must show them forwarded,
# not dropped.
#
# The VM forwards in testpmd's `mac` mode, not `io`: io leaves the frame as it is, so the same
# frame (same destination MAC) would have to be switched a -> b on one pass and b -> a on the
# next; no MAC-learning switch does that. `mac` mode writes the TX port's MAC as source and its
# peer's as destination (--eth-peer), which is what two VMs talking through a switch do. Both
# switches see the same VM.
#
# Usage: bench/pvp-testpmd.sh [--quick] [--seconds N] [--sizes "64 1518 9000"] [--repeat N]
#                             [--vmq-only] [--no-json]
#   --quick     vmq only, 64-byte frames, about 6 s: checks that frames flow through vmq
#   --seconds   measured seconds per run (default 10, after 3 s of warm-up)
#   --repeat    runs per switch and size, vmq and testpmd alternating (default 3; medians shown)
#   --vmq-only  no testpmd switch runs (profiling vmq)
#   --no-json   don't write bench/results/pvp-testpmd-DATE.json
# Environment: VMQ=path/to/vmq (default: cargo build --release -p vmq), CARGO_TARGET_DIR,
#   PVP_KEEP_WORK=1 keeps the work directory (testpmd and vmq output) for a look afterwards.
# Needs root (hugepages), dpdk-testpmd (Debian package dpdk), taskset, 2 or more CPUs.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
args="$*"
quick=0
seconds=10
warmup=3
sizes="64 1518 9000"
repeat=3
vmq_only=0
write_json=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --seconds) seconds=${2:?}; shift ;;
        --sizes) sizes=${2:?}; shift ;;
        --repeat) repeat=${2:?}; shift ;;
        --vmq-only) vmq_only=1 ;;
        --no-json) write_json=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "pvp-testpmd: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    seconds=2 warmup=1 sizes=64 write_json=0 repeat=1
fi

die() { echo "pvp-testpmd: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (hugepages)"
for tool in dpdk-testpmd taskset stdbuf python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpdk coreutils util-linux python3)"
done
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (VM on CPU 0, switch on CPU 1)"

if [ -z "${VMQ:-}" ]; then
    (cd "$root" && cargo build --release -q -p vmq)
    VMQ=${CARGO_TARGET_DIR:-$root/target}/release/vmq
fi
[ -x "$VMQ" ] || die "no vmq binary at $VMQ"

# --- everything this script creates, undone on exit (normal, error, Ctrl-C) -------------------
work=$(mktemp -d /tmp/vqq-pvp.XXXXXX)
pids=()             # processes we started
prefixes=()         # DPDK --file-prefix runtime directories under /run/dpdk
huge_mounted=0
huge_before=""      # nr_hugepages before we raised it
huge_set=""         # what we set it to

pause_pid=""
pause_for() { # SECONDS: sleep in the background and wait, so that a signal's trap runs at once
    sleep "$1" &
    pause_pid=$!
    wait "$pause_pid"
    pause_pid=""
}

stop_pid() { # PID: SIGTERM, 5 s, SIGKILL
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? pid p
    set +e
    [ -n "$pause_pid" ] && kill "$pause_pid" 2>/dev/null
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
    wait 2>/dev/null
    if [ "$huge_mounted" = 1 ]; then umount "$work/huge"; fi
    for p in "${prefixes[@]}"; do rm -rf "/run/dpdk/$p"; done
    # Give the pages back, unless someone else changed the setting meanwhile.
    if [ -n "$huge_set" ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = "$huge_set" ]; then
        echo "$huge_before" > /proc/sys/vm/nr_hugepages
    fi
    if [ "$status" != 0 ] && [ -d "$work" ]; then
        for f in "$work"/*.out "$work"/*.log; do
            [ -f "$f" ] && { echo "--- $f (tail)" >&2; tail -15 "$f" >&2; }
        done
    fi
    if [ -n "${PVP_KEEP_WORK:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- hugepages: 2 x 512 MiB for the two DPDK processes ------------------------------------------
need_pages=600
free_pages=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
if [ "$free_pages" -lt "$need_pages" ]; then
    huge_before=$(cat /proc/sys/vm/nr_hugepages)
    huge_set=$((huge_before + need_pages - free_pages))
    echo "$huge_set" > /proc/sys/vm/nr_hugepages
    free_pages=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
    [ "$free_pages" -ge "$need_pages" ] || die "only $free_pages free 2 MiB hugepages (need $need_pages)"
fi
mkdir -p "$work/huge"
mount -t hugetlbfs -o pagesize=2M nodev "$work/huge"
huge_mounted=1

# --- dpdk-testpmd driven through a FIFO on its stdin -----------------------------------------
# The script holds each FIFO open read-write (fd in tp_fd), so testpmd never sees EOF.
declare -A tp_fd tp_pid
tp_start() { # NAME CPU EAL/APP ARGS...: starts testpmd NAME with two lcores on CPU
    local name=$1 cpu=$2 fd
    shift 2
    mkfifo "$work/$name.in"
    exec {fd}<>"$work/$name.in"
    tp_fd[$name]=$fd
    prefixes+=("vqq-$name-$$")
    stdbuf -oL dpdk-testpmd --lcores "0@$cpu,1@$cpu" --no-pci --file-prefix "vqq-$name-$$" \
        --huge-dir "$work/huge" -m 512 "$@" <"$work/$name.in" >"$work/$name.out" 2>&1 &
    tp_pid[$name]=$!
    pids+=("$!")
    wait_output "$name" 'testpmd> ' 1 60
}

wait_output() { # NAME PATTERN COUNT TIMEOUT_S: until PATTERN occurs COUNT times in NAME's output
    local name=$1 pattern=$2 count=$3 timeout=$4 i n
    for i in $(seq $((timeout * 10))); do
        n=$(grep -c -F -- "$pattern" "$work/$name.out" 2>/dev/null || true)
        [ "${n:-0}" -ge "$count" ] && return 0
        kill -0 "${tp_pid[$name]}" 2>/dev/null || die "testpmd $name exited: $(tail -5 "$work/$name.out")"
        sleep 0.1
    done
    die "testpmd $name: no '$pattern' within ${timeout} s: $(tail -5 "$work/$name.out")"
}

tp_cmd() { echo "$2" >&"${tp_fd[$1]}"; }

tp_rx_total() { # NAME: "PACKETS BYTES" received on ports 0 and 1, from a fresh `show port stats all`
    local name=$1 before
    before=$(grep -c -F 'NIC statistics for port 1' "$work/$name.out" || true)
    tp_cmd "$name" "show port stats all"
    wait_output "$name" 'NIC statistics for port 1' $((before + 1)) 10
    # The block of port 1 ends with a line of #; wait until it is complete.
    wait_output "$name" '############################################################################' $((2 * (before + 1))) 10
    awk -v want=$((before + 1)) '
        /NIC statistics for port 0/ { blocks++ }
        blocks == want && /RX-packets:/ { packets += $2; bytes += $6 }
        END { printf "%.0f %.0f\n", packets, bytes }' "$work/$name.out"
}

tp_stop() { # NAME
    local name=$1 i
    tp_cmd "$name" "stop" || true
    tp_cmd "$name" "quit" || true
    for i in $(seq 100); do kill -0 "${tp_pid[$name]}" 2>/dev/null || break; sleep 0.1; done
    stop_pid "${tp_pid[$name]}"
    local fd=${tp_fd[$name]}
    exec {fd}>&-
    rm -f "$work/$name.in"
}

# --- one measurement ----------------------------------------------------------------------------
mac_a=52:54:00:00:aa:00
mac_b=52:54:00:00:aa:01

size_args() { # SIZE: testpmd options for the frame size (jumbo: large mbufs, MTU 9000). They
    # must come before --txpkts: testpmd checks --txpkts against the mbuf size known so far and
    # falls back to 64 bytes (with only a message) if it does not fit.
    if [ "$1" -gt 2000 ]; then
        echo "--mbuf-size=10240 --max-pkt-len=9018 --total-num-mbufs=16384"
    else
        echo "--total-num-mbufs=16384"
    fi
}

start_vm() { # SIZE
    local size=$1
    # shellcheck disable=SC2046
    tp_start vm 0 --single-file-segments \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=1,queue_size=1024,mac=$mac_a" \
        --vdev "net_virtio_user1,path=$work/b.sock,queues=1,queue_size=1024,mac=$mac_b" \
        -- -i --forward-mode=mac --nb-cores=1 --rxd=1024 --txd=1024 \
        --eth-peer=0,$mac_b --eth-peer=1,$mac_a $(size_args "$size") --txpkts="$size"
}

thread_cpu_ns() { # PID THREAD-NAME: CPU time the process's threads of that name have used (ns)
    local t sum=0
    for t in /proc/"$1"/task/*; do
        [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] && sum=$((sum + $(cut -d' ' -f1 "$t/schedstat")))
    done
    echo "$sum"
}

measured_rate=""    # frames/s the VM received, both ports
measured_cpu=""     # ns of the switch's forwarding thread per delivered frame
measure() { # SIZE SWITCH-PID SWITCH-THREAD: run the loop: prime, warm up, count for $seconds
    local t0 t1 n0 n1 b0 b1 c0 c1
    tp_cmd vm "start tx_first 32"
    pause_for "$warmup"
    c0=$(thread_cpu_ns "$2" "$3"); read -r n0 b0 <<<"$(tp_rx_total vm)"; t0=$(date +%s.%N)
    pause_for "$seconds"
    c1=$(thread_cpu_ns "$2" "$3"); read -r n1 b1 <<<"$(tp_rx_total vm)"; t1=$(date +%s.%N)
    [ "$n1" -gt "$n0" ] || die "no frames came round the loop (size $1)"
    # The frames are the size asked for (testpmd quietly sends 64 bytes if --txpkts is refused).
    [ $(((b1 - b0) / (n1 - n0))) = "$1" ] || die "frames of $(((b1 - b0) / (n1 - n0))) bytes, not $1"
    measured_rate=$(python3 -c "print(($n1 - $n0) / ($t1 - $t0))")
    measured_cpu=$(python3 -c "print(($c1 - $c0) / ($n1 - $n0))")
}

vmq_stats_json() { "$VMQ" ctl --socket "$work/ctl.sock" --json stats; }

run_vmq() { # SIZE -> vmq_rate, vmq_cpu, vmq_check
    local size=$1 pid before after
    rm -f "$work/a.sock" "$work/b.sock" "$work/ctl.sock"
    cat > "$work/vmq.toml" <<EOF
[switch]
mode = "vmq"
workers = 1

[control]
socket = "$work/ctl.sock"
metrics = "off"

[[port]]
name = "a"
kind = "vhost-user"
socket = "$work/a.sock"
mac = "$mac_a"
mtu = 9000

[[port]]
name = "b"
kind = "vhost-user"
socket = "$work/b.sock"
mac = "$mac_b"
mtu = 9000
EOF
    NO_COLOR=1 taskset -c 1 "$VMQ" run --config "$work/vmq.toml" >"$work/vmq.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    local i
    for i in $(seq 100); do
        "$VMQ" ctl --socket "$work/ctl.sock" show >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || die "vmq exited: $(tail -5 "$work/vmq.log")"
        sleep 0.1
    done
    start_vm "$size"
    for i in $(seq 100); do
        [ "$("$VMQ" ctl --socket "$work/ctl.sock" show | grep -c ' up ')" = 2 ] && break
        sleep 0.1
    done
    before=$(vmq_stats_json)
    measure "$size" "$pid" vmq-worker-0
    vmq_rate=$measured_rate
    vmq_cpu=$measured_cpu
    after=$(vmq_stats_json)
    tp_stop vm
    stop_pid "$pid"
    # Forwarded, not dropped: what the VM received went through vmq's ports, and vmq counted
    # no drops (the figure is then a forwarding rate, not an offered one).
    vmq_check=$(python3 - "$before" "$after" "$vmq_rate" "$seconds" <<'PY'
import json, sys
before, after = (json.loads(s)["result"]["ports"] for s in sys.argv[1:3])
rate, secs = float(sys.argv[3]), float(sys.argv[4])
b = {p["port"]: p for p in before}
tx = sum(p["tx_packets"] - b[p["port"]]["tx_packets"] for p in after)
rx = sum(p["rx_packets"] - b[p["port"]]["rx_packets"] for p in after)
drops = {}
for p in after:
    for reason, n in p["drops"].items():
        d = n - b[p["port"]]["drops"][reason]
        if d:
            drops[f'{p["port"]}:{reason}'] = d
print(json.dumps({"vmq_rx_frames": rx, "vmq_tx_frames": tx, "drops": drops}))
PY
)
}

run_testpmd_switch() { # SIZE -> tp_rate, tp_cpu
    local size=$1
    rm -f "$work/a.sock" "$work/b.sock"
    # shellcheck disable=SC2046
    tp_start sw 1 \
        --vdev "net_vhost0,iface=$work/a.sock,queues=1" --vdev "net_vhost1,iface=$work/b.sock,queues=1" \
        -- -i --forward-mode=io --nb-cores=1 --rxd=1024 --txd=1024 $(size_args "$size")
    tp_cmd sw "start"
    start_vm "$size"
    measure "$size" "${tp_pid[sw]}" rte-worker-1
    tp_rate=$measured_rate
    tp_cpu=$measured_cpu
    tp_stop vm
    tp_stop sw
}

# --- the runs -----------------------------------------------------------------------------------
# The host is shared and noisy: each size alternates vmq and testpmd runs $repeat times, and the
# table shows the medians (every run is in the JSON).
load_before=$(uptime)
echo "pvp-testpmd: $(date -u +%FT%TZ), vmq $VMQ, ${seconds} s per run after ${warmup} s warm-up, $repeat run(s) each"
echo "load: $load_before"
: > "$work/results.txt"
for size in $sizes; do
    for rep in $(seq "$repeat"); do
        vmq_rate="" vmq_check="{}" tp_rate="" vmq_cpu="" tp_cpu=""
        run_vmq "$size"
        echo "size $size run $rep: vmq $(python3 -c "print(f'{$vmq_rate/1e6:.3f} Mpps, {$vmq_cpu:.0f} ns CPU/frame')"), vmq counters $vmq_check"
        echo "$size vmq $vmq_rate $vmq_cpu $vmq_check" >> "$work/results.txt"
        if [ "$quick" = 1 ]; then
            python3 - "$vmq_rate" "$vmq_check" <<'PY' || exit 1
import json, sys
rate, check = float(sys.argv[1]), json.loads(sys.argv[2])
assert rate > 1000, f"no frames flow through vmq ({rate:.0f} frames/s)"
assert check["vmq_tx_frames"] > 0 and not check["drops"], f"vmq counters: {check}"
print(f"quick check passed: {rate/1e6:.3f} Mpps delivered through vmq, no drops")
PY
            continue
        fi
        [ "$vmq_only" = 1 ] && continue
        run_testpmd_switch "$size"
        echo "size $size run $rep: testpmd $(python3 -c "print(f'{$tp_rate/1e6:.3f} Mpps, {$tp_cpu:.0f} ns CPU/frame')")"
        echo "$size testpmd $tp_rate $tp_cpu {}" >> "$work/results.txt"
    done
done
[ "$quick" = 1 ] && exit 0
load_after=$(uptime)
echo "load: $load_after"

mkdir -p "$root/bench/results"
json_out=$root/bench/results/pvp-testpmd-$(date -u +%Y-%m-%d).json
python3 - "$json_out" "$write_json" "$load_before" "$load_after" "$seconds" "$warmup" "$args" "$work/results.txt" <<'PY'
import datetime, json, os, platform, statistics, subprocess, sys
out, write = sys.argv[1], sys.argv[2] == "1"
load_before, load_after, secs, warm, args, path = sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]), sys.argv[7], sys.argv[8]
goal = {64: 1.0, 1518: 1.2, 9000: 1.2}
runs = {}
for line in open(path):
    size, switch, rate, cpu, check = line.rstrip("\n").split(" ", 4)
    runs.setdefault(int(size), {}).setdefault(switch, []).append(
        {"fps": float(rate), "cpu_ns": float(cpu), "counters": json.loads(check)})
rows = []
for size, by in runs.items():
    med = {sw: statistics.median(r["fps"] for r in rs) for sw, rs in by.items()}
    cpu = {sw: statistics.median(r["cpu_ns"] for r in rs) for sw, rs in by.items()}
    vmq, tp = med.get("vmq"), med.get("testpmd")
    rows.append({
        "frame_bytes": size,
        "vmq_mpps": round(vmq / 1e6, 4) if vmq else None,
        "testpmd_mpps": round(tp / 1e6, 4) if tp else None,
        "vmq_gbps": round(vmq * size * 8 / 1e9, 3) if vmq else None,
        "testpmd_gbps": round(tp * size * 8 / 1e9, 3) if tp else None,
        "ratio": round(vmq / tp, 3) if vmq and tp else None,
        # vmq run i against the testpmd run right after it: the load of the moment cancels out more.
        "paired_ratios": [round(a["fps"] / b["fps"], 3) for a, b in zip(by.get("vmq", []), by.get("testpmd", []))],
        "goal_ratio": goal.get(size),
        "vmq_cpu_ns_per_frame": round(cpu["vmq"], 1) if "vmq" in cpu else None,
        "testpmd_cpu_ns_per_frame": round(cpu["testpmd"], 1) if "testpmd" in cpu else None,
        "runs": {sw: [{"mpps": round(r["fps"] / 1e6, 4), "cpu_ns_per_frame": round(r["cpu_ns"], 1), **({"vmq_counters": r["counters"]} if r["counters"] else {})} for r in rs]
                 for sw, rs in by.items()},
    })
f = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
print()
print(f"{'frame':>6} {'vmq Mpps':>9} {'testpmd Mpps':>13} {'vmq Gbit/s':>11} {'testpmd Gbit/s':>15} {'ratio':>6} {'goal':>5}"
      f" {'vmq ns/frame':>13} {'testpmd ns/frame':>17}")
for r in rows:
    goal_s = f"{r['goal_ratio']:.1f}x" if r["goal_ratio"] else "-"
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
    print(f"{r['frame_bytes']:>6} {f(r['vmq_mpps'], 9, 3)} {f(r['testpmd_mpps'], 13, 3)} {f(r['vmq_gbps'], 11, 2)} "
          f"{f(r['testpmd_gbps'], 15, 2)} {ratio:>6} {goal_s:>5} {f(r['vmq_cpu_ns_per_frame'], 13, 1)} "
          f"{f(r['testpmd_cpu_ns_per_frame'], 17, 1)}")
print("(medians; frames the VM received per second, both directions summed; Gbit/s of frame bytes without CRC;")
print(" ns/frame: CPU time of the switch's forwarding thread per delivered frame, idle polling included)")
for r in rows:
    if r["paired_ratios"]:
        print(f"{r['frame_bytes']:>6}: vmq/testpmd of each run pair: {r['paired_ratios']}")
if write:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "vhost-user PVP loopback: vmq (1 worker, CPU 1) vs dpdk-testpmd io forwarding (1 core, CPU 1); "
                     "the VM is dpdk-testpmd in mac mode with 2 virtio-user ports on CPU 0, primed with tx_first 32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
                 "load_before": load_before.strip(), "load_after": load_after.strip()},
        "vmq_git": rev,
        "seconds_per_run": secs,
        "warmup_seconds": warm,
        "command": ("bench/pvp-testpmd.sh " + args).strip(),
        "results": rows,
    }
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    print(f"wrote {out}")
PY
