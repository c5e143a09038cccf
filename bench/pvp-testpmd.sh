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
# The suite (`vmq-bench run`) adds (c) Open vSwitch with its DPDK datapath
# (ovs-vswitchd-dpdk from openvswitch-switch-dpdk: dpdk-init, one PMD on CPU 1 with the whole
# daemon pinned there, two dpdkvhostuserclient ports, the VM's virtio-user ports then act as the
# vhost-user servers, and port-to-port OpenFlow rules in_port=a -> b, b -> a), with
# --switches "vmq testpmd ovs-dpdk".
#
# Usage: bench/pvp-testpmd.sh [--quick] [--seconds N] [--sizes "64 1518 9000"] [--repeat N]
#                             [--vmq-only] [--no-json] [--switches "vmq testpmd ovs-dpdk"]
#                             [--json-out FILE] [--prefix P]
#   --quick     64-byte frames, about 6 s per switch: checks that frames flow (vmq only,
#               unless --switches is given)
#   --seconds   measured seconds per run (default 10, after 3 s of warm-up)
#   --repeat    runs per switch and size, vmq and testpmd alternating (default 3; medians shown)
#   --vmq-only  no testpmd switch runs (profiling vmq)
#   --no-json   don't write bench/results/pvp-testpmd-DATE.json
#   --switches  the switches to compare (default "vmq testpmd"); "vmq-packed" is vmq with the
#               VM's virtio-user ports on packed virtqueues (packed_vq=1), "vmq" on split ones:
#               --switches "vmq vmq-packed" compares the two ring layouts in one run
#   --json-out  where the JSON goes (default bench/results/pvp-testpmd-DATE.json)
#   --prefix    prefix of the work directory and DPDK file prefixes (default vqq)
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
switches=""
json_out=""
prefix=vqq
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --switches) switches=${2:?}; shift ;;
        --json-out) json_out=${2:?}; shift ;;
        --prefix) prefix=${2:?}; shift ;;
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
    seconds=2 warmup=1 sizes=64 repeat=1
    [ -n "$json_out" ] || write_json=0
    [ -n "$switches" ] || switches=vmq
fi
[ -n "$switches" ] || switches="vmq testpmd"
[ "$vmq_only" = 1 ] && switches=vmq
has_switch() { [[ " $switches " == *" $1 "* ]]; }
for sw in $switches; do
    case "$sw" in vmq|vmq-packed|testpmd|ovs-dpdk) ;; *) echo "pvp-testpmd: unknown switch $sw (vmq, vmq-packed, testpmd, ovs-dpdk)" >&2; exit 2 ;; esac
done

die() { echo "pvp-testpmd: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (hugepages)"
for tool in dpdk-testpmd taskset stdbuf python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpdk coreutils util-linux python3)"
done
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (VM on CPU 0, switch on CPU 1)"
OVS_DPDK=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
if has_switch ovs-dpdk; then
    [ -x "$OVS_DPDK" ] && command -v ovsdb-server >/dev/null && command -v ovs-vsctl >/dev/null && command -v ovs-ofctl >/dev/null \
        || die "ovs-dpdk needs $OVS_DPDK, ovsdb-server, ovs-vsctl, ovs-ofctl (apt-get install openvswitch-switch-dpdk)"
fi

if [ -z "${VMQ:-}" ]; then
    (cd "$root" && cargo build --release -q -p vmq)
    VMQ=${CARGO_TARGET_DIR:-$root/target}/release/vmq
fi
[ -x "$VMQ" ] || die "no vmq binary at $VMQ"

# --- everything this script creates, undone on exit (normal, error, Ctrl-C) -------------------
work=$(mktemp -d "/tmp/$prefix-pvp.XXXXXX")
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
# OVS-DPDK gets 1 GiB of socket memory (jumbo mbufs, one pool per port) next to the VM's 512 MiB.
has_switch ovs-dpdk && need_pages=850
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
    prefixes+=("$prefix-$name-$$")
    stdbuf -oL dpdk-testpmd --lcores "0@$cpu,1@$cpu" --no-pci --file-prefix "$prefix-$name-$$" \
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

vm_rings=""         # ",packed_vq=1": the VM's virtio-user ports use packed virtqueues
start_vm() { # SIZE [VHOST-SERVER: ,server=1 when the switch is the vhost-user client]
    local size=$1 server=${2:-}$vm_rings
    # shellcheck disable=SC2046
    tp_start vm 0 --single-file-segments \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=1,queue_size=1024,mac=$mac_a$server" \
        --vdev "net_virtio_user1,path=$work/b.sock,queues=1,queue_size=1024,mac=$mac_b$server" \
        -- -i --forward-mode=mac --nb-cores=1 --rxd=1024 --txd=1024 \
        --eth-peer=0,$mac_b --eth-peer=1,$mac_a $(size_args "$size") --txpkts="$size"
}

thread_cpu_ns() { # PID THREAD-NAME-PREFIX: CPU time the process's threads of that name have used (ns)
    local t sum=0 comm
    for t in /proc/"$1"/task/*; do
        comm=$(cat "$t/comm" 2>/dev/null) || continue
        [[ "$comm" == "$2"* ]] && sum=$((sum + $(cut -d' ' -f1 "$t/schedstat")))
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
    local avg=$(((b1 - b0) / (n1 - n0)))
    if [ "$avg" != "$1" ]; then
        # A few frames of another size (the round's start) shift the average by a byte; a
        # refused --txpkts (64-byte frames) does not pass this.
        [ "$avg" -ge $(($1 * 99 / 100)) ] || die "frames of $avg bytes on average, not $1"
        echo "pvp-testpmd: note: frames of $avg bytes on average, not $1" >&2
    fi
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
trust_frontend_memory = true   # testpmd's hugetlbfs files cannot be sealed
mac = "$mac_a"
mtu = 9000

[[port]]
name = "b"
kind = "vhost-user"
socket = "$work/b.sock"
trust_frontend_memory = true
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

ovs_db_started=0
ovs_vsctl() { ovs-vsctl --db="unix:$work/ovs/db.sock" --timeout=30 "$@"; }

ovs_db_start() { # once per script run: ovsdb-server in $work/ovs, as our child (no --detach)
    [ "$ovs_db_started" = 1 ] && return 0
    mkdir -p "$work/ovs"
    export OVS_RUNDIR="$work/ovs" OVS_LOGDIR="$work/ovs" OVS_DBDIR="$work/ovs"
    ovsdb-tool create "$work/ovs/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$work/ovs/conf.db" --remote="punix:$work/ovs/db.sock" --pidfile="$work/ovs/ovsdb-server.pid" \
        --log-file="$work/ovs/ovsdb-server.log" >/dev/null 2>&1 &
    pids+=("$!")
    local i
    for i in $(seq 100); do [ -S "$work/ovs/db.sock" ] && break; sleep 0.1; done
    ovs_vsctl --no-wait init
    prefixes+=("$prefix-ovs-$$")
    ovs_vsctl --no-wait set Open_vSwitch . other_config:dpdk-init=true other_config:pmd-cpu-mask=0x2 \
        other_config:dpdk-lcore-mask=0x2 other_config:dpdk-socket-mem=1024 other_config:per-port-memory=true \
        "other_config:dpdk-extra=--no-pci --file-prefix=$prefix-ovs-$$ --huge-dir=$work/huge"
    ovs_vsctl --no-wait add-br br0 -- set bridge br0 datapath_type=netdev
    ovs_db_started=1
}

run_ovs_switch() { # SIZE -> ovs_rate, ovs_cpu
    local size=$1 pid i mtu=1500
    # 1518-byte frames without CRC carry 1504 bytes of IP: above MTU 1500 (vmq runs MTU 9000).
    [ "$size" -gt 1514 ] && mtu=9000
    ovs_db_start
    rm -f "$work/a.sock" "$work/b.sock" "$work/ovs/ovs-vswitchd.pid"
    ovs_vsctl --no-wait --if-exists del-port br0 a -- --if-exists del-port br0 b
    ovs_vsctl --no-wait add-port br0 a -- set Interface a type=dpdkvhostuserclient \
        "options:vhost-server-path=$work/a.sock" "mtu_request=$mtu" \
        -- add-port br0 b -- set Interface b type=dpdkvhostuserclient "options:vhost-server-path=$work/b.sock" "mtu_request=$mtu"
    taskset -c 1 "$OVS_DPDK" "unix:$work/ovs/db.sock" --pidfile="$work/ovs/ovs-vswitchd.pid" \
        --log-file="$work/ovs/ovs-vswitchd.log" >"$work/ovs-vswitchd.out" 2>&1 &
    pid=$!
    pids+=("$pid")
    for i in $(seq 600); do
        [ "$(ovs_vsctl get Open_vSwitch . dpdk_initialized 2>/dev/null)" = true ] && break
        kill -0 "$pid" 2>/dev/null || die "ovs-vswitchd-dpdk exited: $(tail -5 "$work/ovs/ovs-vswitchd.log")"
        sleep 0.1
    done
    [ "$(ovs_vsctl get Open_vSwitch . dpdk_initialized)" = true ] || die "OVS-DPDK did not initialise DPDK"
    # dpdk_initialized may still say true from the previous daemon: this one is up once it
    # answers OpenFlow requests for br0 (the old one's socket is gone with it).
    for i in $(seq 600); do
        ovs-ofctl show br0 >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || die "ovs-vswitchd-dpdk exited: $(tail -5 "$work/ovs/ovs-vswitchd.log")"
        sleep 0.1
    done
    ovs-ofctl del-flows br0 >/dev/null
    # Port to port, as testpmd's io forwarding: no MAC learning on the way.
    ovs-ofctl add-flow br0 in_port=a,actions=output:b
    ovs-ofctl add-flow br0 in_port=b,actions=output:a
    start_vm "$size" ",server=1"
    # Both vhost-user connections up (the VM is the server; OVS reconnects every second).
    for i in $(seq 200); do
        [ "$(ovs_vsctl get Interface a link_state 2>/dev/null)$(ovs_vsctl get Interface b link_state 2>/dev/null)" = upup ] && break
        sleep 0.1
    done
    measure "$size" "$pid" pmd
    ovs_rate=$measured_rate
    ovs_cpu=$measured_cpu
    tp_stop vm
    stop_pid "$pid"
    wait "$pid" 2>/dev/null || true
}

# --- the runs -----------------------------------------------------------------------------------
# The host is shared and noisy: each size alternates vmq and testpmd runs $repeat times, and the
# table shows the medians (every run is in the JSON).
load_before=$(uptime)
echo "pvp-testpmd: $(date -u +%FT%TZ), vmq $VMQ, ${seconds} s per run after ${warmup} s warm-up, $repeat run(s) each"
echo "load: $load_before"
: > "$work/results.txt"
read -r -a switch_list <<<"$switches"
for size in $sizes; do
    for rep in $(seq "$repeat"); do
        # The switches take turns going first (A B, B A, ...).
        n=${#switch_list[@]}
        for k in $(seq 0 $((n - 1))); do
            sw=${switch_list[$(( (k + rep - 1) % n ))]}
            case "$sw" in
                vmq|vmq-packed)
                    vmq_rate="" vmq_check="{}" vmq_cpu=""
                    [ "$sw" = vmq-packed ] && vm_rings=",packed_vq=1"
                    run_vmq "$size"
                    vm_rings=""
                    rate=$vmq_rate cpu=$vmq_cpu check=$vmq_check ;;
                testpmd)
                    run_testpmd_switch "$size"
                    rate=$tp_rate cpu=$tp_cpu check="{}" ;;
                ovs-dpdk)
                    run_ovs_switch "$size"
                    rate=$ovs_rate cpu=$ovs_cpu check="{}" ;;
            esac
            echo "size $size run $rep: $sw $(python3 -c "print(f'{$rate/1e6:.3f} Mpps, {$cpu:.0f} ns CPU/frame')"), counters $check"
            echo "$size $sw $rate $cpu $check" >> "$work/results.txt"
            if [ "$quick" = 1 ]; then
                python3 - "$sw" "$rate" "$check" <<'PY' || exit 1
import json, sys
sw, rate, check = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
assert rate > 1000, f"no frames flow through {sw} ({rate:.0f} frames/s)"
if sw.startswith("vmq"):
    assert check["vmq_tx_frames"] > 0 and not check["drops"], f"vmq counters: {check}"
print(f"quick check passed: {rate/1e6:.3f} Mpps delivered through {sw}" + (", no drops" if sw.startswith("vmq") else ""))
PY
            fi
        done
    done
done
load_after=$(uptime)
echo "load: $load_after"
[ "$quick" = 1 ] && [ "$write_json" = 0 ] && exit 0

mkdir -p "$root/bench/results"
[ -n "$json_out" ] || json_out=$root/bench/results/pvp-testpmd-$(date -u +%Y-%m-%d).json
python3 - "$json_out" "$write_json" "$load_before" "$load_after" "$seconds" "$warmup" "$args" "$work/results.txt" <<'PY'
import datetime, json, os, platform, statistics, subprocess, sys
out, write = sys.argv[1], sys.argv[2] == "1"
load_before, load_after, secs, warm, args, path = sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6]), sys.argv[7], sys.argv[8]
goal = {64: 1.0, 1518: 1.2, 9000: 1.2}
goal_ovs = 2.0
runs = {}
for line in open(path):
    size, switch, rate, cpu, check = line.rstrip("\n").split(" ", 4)
    runs.setdefault(int(size), {}).setdefault(switch, []).append(
        {"fps": float(rate), "cpu_ns": float(cpu), "counters": json.loads(check)})
rows = []
for size, by in runs.items():
    med = {sw: statistics.median(r["fps"] for r in rs) for sw, rs in by.items()}
    cpu = {sw: statistics.median(r["cpu_ns"] for r in rs) for sw, rs in by.items()}
    vmq, tp, ovs = med.get("vmq"), med.get("testpmd"), med.get("ovs-dpdk")
    rows.append({
        "frame_bytes": size,
        "vmq_mpps": round(vmq / 1e6, 4) if vmq else None,
        "testpmd_mpps": round(tp / 1e6, 4) if tp else None,
        "ovs_dpdk_mpps": round(ovs / 1e6, 4) if ovs else None,
        "vmq_gbps": round(vmq * size * 8 / 1e9, 3) if vmq else None,
        "testpmd_gbps": round(tp * size * 8 / 1e9, 3) if tp else None,
        "ovs_dpdk_gbps": round(ovs * size * 8 / 1e9, 3) if ovs else None,
        "ratio": round(vmq / tp, 3) if vmq and tp else None,
        "ratio_ovs_dpdk": round(vmq / ovs, 3) if vmq and ovs else None,
        # vmq run i against the peer's run i: the load of the moment cancels out more.
        "paired_ratios": [round(a["fps"] / b["fps"], 3) for a, b in zip(by.get("vmq", []), by.get("testpmd", []))],
        "paired_ratios_ovs_dpdk": [round(a["fps"] / b["fps"], 3) for a, b in zip(by.get("vmq", []), by.get("ovs-dpdk", []))],
        "goal_ratio": goal.get(size),
        "goal_ratio_ovs_dpdk": goal_ovs,
        "vmq_cpu_ns_per_frame": round(cpu["vmq"], 1) if "vmq" in cpu else None,
        "testpmd_cpu_ns_per_frame": round(cpu["testpmd"], 1) if "testpmd" in cpu else None,
        "ovs_dpdk_cpu_ns_per_frame": round(cpu["ovs-dpdk"], 1) if "ovs-dpdk" in cpu else None,
        # Packed virtqueues in the VM (vmq-packed) against split ones (vmq), same switch.
        "vmq_packed_mpps": round(med["vmq-packed"] / 1e6, 4) if "vmq-packed" in med else None,
        "ratio_packed_split": round(med["vmq-packed"] / vmq, 3) if vmq and "vmq-packed" in med else None,
        "paired_ratios_packed_split": [round(a["fps"] / b["fps"], 3) for a, b in zip(by.get("vmq-packed", []), by.get("vmq", []))],
        "vmq_packed_cpu_ns_per_frame": round(cpu["vmq-packed"], 1) if "vmq-packed" in cpu else None,
        "runs": {sw: [{"mpps": round(r["fps"] / 1e6, 4), "cpu_ns_per_frame": round(r["cpu_ns"], 1), **({"vmq_counters": r["counters"]} if r["counters"] else {})} for r in rs]
                 for sw, rs in by.items()},
    })
f = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
x = lambda v: f"{v:.2f}x" if v else "-"
print()
print(f"{'frame':>6} {'vmq Mpps':>9} {'testpmd':>8} {'OVS-DPDK':>9} {'vmq/tp':>7} {'goal':>5} {'vmq/OVS':>8} {'goal':>5}"
      f" {'ns/frame: vmq':>14} {'testpmd':>8} {'OVS-DPDK':>9}")
for r in rows:
    goal_s = f"{r['goal_ratio']:.1f}x" if r["goal_ratio"] else "-"
    print(f"{r['frame_bytes']:>6} {f(r['vmq_mpps'], 9, 3)} {f(r['testpmd_mpps'], 8, 3)} {f(r['ovs_dpdk_mpps'], 9, 3)} "
          f"{x(r['ratio']):>7} {goal_s:>5} {x(r['ratio_ovs_dpdk']):>8} {goal_ovs:>4.1f}x "
          f"{f(r['vmq_cpu_ns_per_frame'], 14, 1)} {f(r['testpmd_cpu_ns_per_frame'], 8, 1)} {f(r['ovs_dpdk_cpu_ns_per_frame'], 9, 1)}")
print("(medians; frames the VM received per second, both directions summed; Gbit/s of frame bytes without CRC;")
print(" ns/frame: CPU time of the switch's forwarding thread per delivered frame, idle polling included)")
for r in rows:
    if r["paired_ratios"]:
        print(f"{r['frame_bytes']:>6}: vmq/testpmd of each run pair: {r['paired_ratios']}")
    if r["paired_ratios_ovs_dpdk"]:
        print(f"{r['frame_bytes']:>6}: vmq/OVS-DPDK of each run pair: {r['paired_ratios_ovs_dpdk']}")
    if r["paired_ratios_packed_split"]:
        print(f"{r['frame_bytes']:>6}: packed {r['vmq_packed_mpps']:.3f} Mpps ({r['vmq_packed_cpu_ns_per_frame']:.1f} ns/frame) vs split "
              f"{r['vmq_mpps']:.3f} Mpps: packed/split {r['ratio_packed_split']:.2f}x, each run pair: {r['paired_ratios_packed_split']}")
if write:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "vhost-user PVP loopback: vmq (1 worker, CPU 1) vs dpdk-testpmd io forwarding (1 core, CPU 1) "
                     "vs OVS-DPDK (1 PMD, CPU 1, port-to-port flows); "
                     "the VM is dpdk-testpmd in mac mode with 2 virtio-user ports on CPU 0, primed with tx_first 32",
        "switches": sorted({sw for by in runs.values() for sw in by}),
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
