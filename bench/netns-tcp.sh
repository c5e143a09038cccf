#!/usr/bin/env bash
# netns TCP throughput: vmq against a Linux bridge, and vmq mode against switch mode.
#
#   (a) one iperf3 stream between two hosts in network namespaces, offloads on, MTU 1500 and
#       9000: through vmq (TAP ports, `vmq` mode, 2 workers) and through a Linux bridge built
#       in its own namespace with veth pairs (same addresses);
#   (b) an external host (veth behind an AF_PACKET uplink) sending to 3 VMs (TAP ports) at
#       once, 3 iperf3 clients in parallel, summed: vmq in `vmq` mode and in `switch` mode,
#       2 workers.
#
#       --drivers "af_packet af_xdp" measures (b) with each uplink driver (AF_XDP: native XDP on
#       the veth; rows "vmq+af_xdp", "switch+af_xdp") and compares CPU per GB between them.
#
#   (c) 64-byte frames, the same topology as (b): a packet generator in the external namespace
#       (dpdk-testpmd, txonly, three net_af_packet ports on the veth, one per VM MAC, one
#       forwarding core, as fast as it can) sends UDP frames of 64 bytes (as in pvp-testpmd.sh: 64
#       bytes of frame as vmq sees it; a veth carries no FCS) to the 3
#       VMs' MACs; no VM answers. Per (mode, driver) over --seconds after 1 s of warm-up: frames
#       vmq delivered to the VMs (the VM ports' tx_packets in `vmq ctl --json stats`, read by
#       vmq's own clock) as Mpps, and vmq's CPU time (/proc/PID/stat) per million frames.
#       The kernel's receive work on the veth (AF_PACKET: the skb path and packet_rcv; AF_XDP:
#       the XDP program and the copy into the UMEM) runs mostly in the sender's softirq and is
#       charged to the generator, not to vmq: the table shows the generator's CPU too.
#       vmq mode and switch mode with every driver of --drivers; the comparisons are
#       AF_XDP/AF_PACKET frames per vmq CPU-second (goal 1.5x) and vmq/switch mode CPU per
#       frame (goal <= 0.7x). Needs dpdk-testpmd (Debian package dpdk-dev).
#
#       With PERF_DIR=DIR in the environment, each run's measurement window is sampled with
#       `perf record -g -p VMQ` into DIR/perf-c-MODE-64.data (perf report shows where vmq's CPU
#       time goes in each mode; the window is the same length, so the figures stay comparable);
#       in part (a), vmq's runs into DIR/perf-a-vmq-MTU-OFFLOADS-STREAMS.data.
#
#       --xdp-mode generic runs the AF_XDP uplink in generic XDP (on the skb) instead of the
#       veth's native XDP; part (c) only (in part (b) the peer's GSO frames would not fit a
#       UMEM chunk in generic mode).
#
#   The suite (bench/vmq-bench, `vmq-bench run`) widens (a) with options: more switches
#   (--systems "vmq bridge ovs": Open vSwitch's userspace datapath, datapath_type=netdev,
#   ovsdb-server and ovs-vswitchd started here in a temporary directory, the switch in its own
#   namespace), offloads on and off (--offloads "on off": off = vmq ports with offloads = false,
#   OVS without userspace TSO, and every endpoint's interface without TSO/GSO/GRO), MTUs and
#   stream counts (--mtus, --streams; iperf3 -P).
#
# Every measurement also records the CPU time of every process involved (vmq or ovs-vswitchd,
# iperf3 servers and clients: all started in one cgroup v2 of this script, cpu.stat) per GB
# delivered, and, where vmq is the switch, the vmq process's own CPU time per GB
# (/proc/PID/stat utime + stime).
#
# Every measurement is repeated (default 3 rounds, the switches taking turns first, A B / B A)
# and the median is reported. Prints a table; writes bench/results/netns-tcp-<date>.json.
#
# Root only. Everything runs in namespaces this script creates (prefix vqnb, or --prefix) and
# removes on exit, also on failure or Ctrl-C, with every daemon it started (by PID) and its
# cgroup; traffic never leaves them.
#
# usage: bench/netns-tcp.sh [--quick] [--rounds N] [--seconds S] [--vmq PATH] [--out FILE]
#          [--systems "vmq bridge ovs"] [--mtus "1500 9000"] [--offloads "on off"]
#          [--streams "1 4"] [--parts "a b c"] [--drivers "af_packet af_xdp"]
#          [--xdp-mode native|generic] [--prefix P]
set -euo pipefail
shopt -s inherit_errexit

cd "$(dirname "$0")/.."
ROUNDS=3
SECONDS_PER_RUN=10
VMQ=""
OUT=""
QUICK=0
SYSTEMS="vmq bridge"
MTUS="1500 9000"
OFFLOADS="on"
STREAMS="1"
PARTS="a b"
DRIVERS="af_packet"
XDP_MODE=native
P=vqnb                       # prefix of every namespace and interface made here
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; ROUNDS=1; SECONDS_PER_RUN=2 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --seconds) SECONDS_PER_RUN="$2"; shift ;;
        --vmq) VMQ="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --systems) SYSTEMS="$2"; shift ;;
        --mtus) MTUS="$2"; shift ;;
        --offloads) OFFLOADS="$2"; shift ;;
        --streams) STREAMS="$2"; shift ;;
        --parts) PARTS="$2"; shift ;;
        --drivers) DRIVERS="$2"; shift ;;
        --xdp-mode) XDP_MODE="$2"; shift ;;
        --prefix) P="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$VMQ" ]; then
    VMQ=target/release/vmq
    if [ ! -x "$VMQ" ] && [ -n "${CARGO_TARGET_DIR:-}" ]; then VMQ="$CARGO_TARGET_DIR/release/vmq"; fi
fi
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 2; }
[ -x "$VMQ" ] || { echo "no vmq binary at $VMQ (cargo build --release -p vmq, or --vmq PATH)" >&2; exit 2; }
for tool in ip iperf3 python3 ss timeout ethtool; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install iproute2 iperf3 python3 ethtool)" >&2; exit 2; }
done
for sys in $SYSTEMS; do
    case "$sys" in
        vmq|bridge) ;;
        ovs) for tool in ovsdb-tool ovsdb-server ovs-vswitchd ovs-vsctl; do
                 command -v "$tool" >/dev/null || { echo "needs $tool for --systems ovs (apt-get install openvswitch-switch)" >&2; exit 2; }
             done ;;
        *) echo "unknown system $sys (vmq, bridge, ovs)" >&2; exit 2 ;;
    esac
done
for d in $DRIVERS; do case "$d" in af_packet|af_xdp) ;; *) echo "--drivers takes af_packet/af_xdp" >&2; exit 2 ;; esac; done
for part in $PARTS; do case "$part" in a|b|c) ;; *) echo "--parts takes a/b/c" >&2; exit 2 ;; esac; done
case "$XDP_MODE" in
    native) ;;
    generic) if [[ " $PARTS " == *" b "* ]]; then echo "--xdp-mode generic is for part c only" >&2; exit 2; fi ;;
    *) echo "--xdp-mode takes native/generic" >&2; exit 2 ;;
esac
if [[ " $PARTS " == *" c "* ]]; then
    command -v dpdk-testpmd >/dev/null || { echo "needs dpdk-testpmd for --parts c (apt-get install dpdk-dev)" >&2; exit 2; }
fi
for o in $OFFLOADS; do case "$o" in on|off) ;; *) echo "--offloads takes on/off" >&2; exit 2 ;; esac; done
for m in $MTUS; do case "$m" in 1500|9000) ;; *) echo "--mtus takes 1500/9000" >&2; exit 2 ;; esac; done

WORK=$(mktemp -d "/tmp/$P.XXXXXX")
NAMESPACES=()
VMQ_PID=""
OVS_PIDS=()          # ovsdb-server, ovs-vswitchd (read from their pidfiles)
CG=""                # the cgroup every measured process runs in
GEN_PID=""           # part (c)'s packet generator (dpdk-testpmd)
GEN_PREFIX="$P-gen-$$"   # its DPDK runtime directory, /var/run/dpdk/$GEN_PREFIX

log() { printf '%s\n' "$*" >&2; }

cleanup() {
    set +e
    stop_generator
    stop_vmq
    stop_ovs_all
    # iperf3 servers and clients this script started: the processes in its namespaces.
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    if [ -n "$CG" ] && [ -d "$CG" ]; then
        local i
        for i in $(seq 50); do [ -s "$CG/cgroup.procs" ] || break; sleep 0.1; done
        rmdir "$CG" 2>/dev/null || log "cgroup $CG still has processes: $(cat "$CG/cgroup.procs" | tr '\n' ' ')"
    fi
    rm -rf "$WORK" "/var/run/dpdk/$GEN_PREFIX"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls "$@" every 50 ms until it succeeds; fails after $WAIT_S seconds.
WAIT_S=20
wait_for() {
    local deadline=$(( $(date +%s) + WAIT_S ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then log "timed out waiting for: $*"; return 1; fi
        sleep 0.05
    done
}

# --- CPU accounting: one cgroup v2 for every process a measurement involves ------------------
for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    if [ -f "$root/cgroup.procs" ] && [ -f "$root/cgroup.controllers" ]; then
        CG="$root/$P-cpu-$$"
        mkdir "$CG" 2>/dev/null || CG=""
        break
    fi
done
[ -n "$CG" ] || log "no cgroup v2 to account CPU in: CPU figures will be missing"

incg() { # COMMAND...: becomes COMMAND inside the measurement cgroup (children inherit it).
    # It execs: call it as a background job (`incg CMD &`, $! is then CMD's PID) or in a subshell.
    if [ -n "$CG" ]; then
        exec sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@"
    else
        exec "$@"
    fi
}

vmq_usec() { # CPU time the running vmq process alone has used so far, µs ("-" without one)
    local stat
    if [ -n "$VMQ_PID" ] && stat=$(cat "/proc/$VMQ_PID/stat" 2>/dev/null); then
        # utime and stime (fields 14, 15; after the parenthesised name), in clock ticks.
        awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%d\n", ($12 + $13) * 1e6 / hz }' <<<"$stat"
    else
        echo -
    fi
}

cg_usec() { # CPU time used so far by the cgroup's processes, µs (0 without a cgroup)
    if [ -n "$CG" ]; then awk '$1 == "usage_usec" {print $2}' "$CG/cpu.stat"; else echo 0; fi
}

mkns() {
    ip netns del "$1" 2>/dev/null || true
    ip netns add "$1"
    NAMESPACES+=("$1")
    ip -n "$1" link set lo up
    # No IPv6 chatter.
    ip netns exec "$1" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
}

# ----------------------------------------------------------------------------------------------
# vmq

vmq_ready() {
    "$VMQ" ctl --socket "$WORK/vmq.sock" --json show | python3 -c '
import json, sys
r = json.load(sys.stdin)
sys.exit(0 if r["ok"] and all(p["state"] == "up" for p in r["result"]["ports"]) else 1)'
}

# start_vmq CONFIG-BODY: runs vmq with the body plus a [control] section, waits for its ports.
start_vmq() {
    printf '%s\n[control]\nsocket = "%s"\nmetrics = "off"\n' "$1" "$WORK/vmq.sock" > "$WORK/vmq.toml"
    incg env RUST_LOG=warn "$VMQ" run --config "$WORK/vmq.toml" >>"$WORK/vmq.log" 2>&1 &
    VMQ_PID=$!
    if ! wait_for vmq_ready; then
        log "vmq did not come up:"; tail -20 "$WORK/vmq.log" >&2; return 1
    fi
}

stop_vmq() {
    [ -n "$VMQ_PID" ] || return 0
    kill -TERM "$VMQ_PID" 2>/dev/null || true
    local deadline=$(( $(date +%s) + 10 ))
    while kill -0 "$VMQ_PID" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$VMQ_PID" 2>/dev/null || true
    wait "$VMQ_PID" 2>/dev/null || true
    VMQ_PID=""
}

tap_port() { # name ifname netns mac mtu [offloads: true|false]
    printf '[[port]]\nname = "%s"\nkind = "tap"\nifname = "%s"\nnetns = "%s"\nmac = "%s"\nmtu = %s\noffloads = %s\n\n' "$1" "$2" "$3" "$4" "$5" "${6:-true}"
}

# ----------------------------------------------------------------------------------------------
# Open vSwitch, userspace datapath: its own OVS_RUNDIR/LOGDIR/DBDIR under $WORK, ovs-vswitchd
# in namespace ${P}-ovs (where the switch side of the veths is), in the measurement cgroup.

OVSDIR="$WORK/ovs"
VSCTL=(ovs-vsctl --db="unix:$OVSDIR/db.sock" --timeout=20)
OVSDB_PID=""
VSWITCHD_PID=""

# The daemons run as this script's children (no --detach): their PIDs are known at once, and
# this script reaps them (the init of a container may not).
start_ovsdb() {
    mkdir -p "$OVSDIR"
    export OVS_RUNDIR="$OVSDIR" OVS_LOGDIR="$OVSDIR" OVS_DBDIR="$OVSDIR"
    ovsdb-tool create "$OVSDIR/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$OVSDIR/conf.db" --remote="punix:$OVSDIR/db.sock" --pidfile="$OVSDIR/ovsdb-server.pid" \
        --log-file="$OVSDIR/ovsdb-server.log" >/dev/null 2>&1 &
    OVSDB_PID=$!
    OVS_PIDS+=("$OVSDB_PID")
    wait_for test -S "$OVSDIR/db.sock" || { log "ovsdb-server did not start:"; tail -20 "$OVSDIR/ovsdb-server.log" >&2; return 1; }
    "${VSCTL[@]}" --no-wait init
}

start_vswitchd() { # TSO: true|false
    "${VSCTL[@]}" --no-wait set Open_vSwitch . "other_config:userspace-tso-enable=$1"
    incg ip netns exec "${P}-ovs" ovs-vswitchd "unix:$OVSDIR/db.sock" --pidfile="$OVSDIR/ovs-vswitchd.pid" \
        --log-file="$OVSDIR/ovs-vswitchd.log" >/dev/null 2>&1 &
    VSWITCHD_PID=$!
    OVS_PIDS+=("$VSWITCHD_PID")
    # Up: it has written its pidfile, which it does once it has read the database.
    wait_for test -s "$OVSDIR/ovs-vswitchd.pid" || { log "ovs-vswitchd did not start:"; tail -20 "$OVSDIR/ovs-vswitchd.log" >&2; return 1; }
}

alive() { # PID: running (a zombie left to an init that does not reap is not)
    kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_pid() { # PID: TERM, up to 10 s, KILL
    local pid=$1 deadline=$(( $(date +%s) + 10 ))
    kill -TERM "$pid" 2>/dev/null || return 0
    while alive "$pid" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
}

# wait_server PID: a one-off iperf3 server ends right after its client; if the client never
# reached it, it would wait for ever: 5 s, then it is stopped.
wait_server() {
    local deadline=$(( $(date +%s) + 5 ))
    while alive "$1" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

stop_vswitchd() {
    [ -n "$VSWITCHD_PID" ] || return 0
    stop_pid "$VSWITCHD_PID"
    wait "$VSWITCHD_PID" 2>/dev/null || true
    rm -f "$OVSDIR/ovs-vswitchd.pid"
    VSWITCHD_PID=""
}

stop_ovs_all() {
    local pid
    for pid in "${OVS_PIDS[@]}"; do stop_pid "$pid"; wait "$pid" 2>/dev/null; done
    OVS_PIDS=()
    VSWITCHD_PID=""
}

# Endpoint offloads. "off": no checksum offload, TSO, GSO or GRO on the host's interface (as
# a vmq port with offloads = false gives its TAP; OVS without userspace TSO also forwards
# nothing from a veth that leaves checksums to offload); "on": checksum offload, TSO and GSO
# on, GRO as the interface had it when it was made (veth: off).
declare -A GRO_DEFAULT
set_endpoint_offloads() { # NS DEV on|off
    local ns=$1 dev=$2 gro
    [ -n "${GRO_DEFAULT[$dev]:-}" ] || GRO_DEFAULT[$dev]=$(ip netns exec "$ns" ethtool -k "$dev" | awk '$1 == "generic-receive-offload:" {print $2}')
    if [ "$3" = off ]; then
        ip netns exec "$ns" ethtool -K "$dev" tx off tso off gso off gro off >/dev/null 2>&1 || true
        if ip netns exec "$ns" ethtool -k "$dev" | grep -Eq '^(tx-checksumming|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload): on'; then
            log "could not turn offloads off on $dev in $ns"; return 1
        fi
    else
        gro=${GRO_DEFAULT[$dev]}
        ip netns exec "$ns" ethtool -K "$dev" tx on tso on gso on gro "${gro:-off}" >/dev/null 2>&1 || true
    fi
}

# ----------------------------------------------------------------------------------------------
# iperf3

listening() { ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q .; }

# start_server NS PORT: a one-off iperf3 server; its PID in SERVER_PID.
start_server() {
    incg ip netns exec "$1" iperf3 -s -1 -p "$2" >/dev/null 2>&1 &
    SERVER_PID=$!
    wait_for listening "$1" "$2"
}

run_client() { # ns address port outfile [streams]
    ( incg timeout $(( SECONDS_PER_RUN + 30 )) ip netns exec "$1" \
        iperf3 -c "$2" -p "$3" -t "$SECONDS_PER_RUN" -P "${5:-1}" --connect-timeout 5000 -J > "$4" )
}

# measure_of CPU_USEC VMQ_USEC iperf3-JSON...: "Gbit/s cpu_s bytes vmq_cpu_s" (summed receiver
# figures; vmq_cpu_s is "-" when vmq was not the switch)
measure_of() {
    python3 - "$@" <<'PY'
import json, sys
cpu_usec, vmq_usec, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
bps = 0.0
nbytes = 0
for f in files:
    r = json.load(open(f))
    if "error" in r:
        sys.exit(f"iperf3: {r['error']}")
    bps += r["end"]["sum_received"]["bits_per_second"]
    nbytes += r["end"]["sum_received"]["bytes"]
if nbytes <= 0:
    sys.exit("iperf3: nothing delivered")
vmq_cpu = "-" if vmq_usec == "-" else f"{int(vmq_usec) / 1e6:.3f}"
print(f"{bps / 1e9:.3f} {cpu_usec / 1e6:.3f} {nbytes} {vmq_cpu}")
PY
}

usec_delta() { # BEFORE AFTER: AFTER - BEFORE, or "-" if either is unknown
    if [ "$1" = - ] || [ "$2" = - ]; then echo -; else echo $(($2 - $1)); fi
}

one_stream() { # server-ns client-ns address port [streams]
    local c0 c1 v0 v1
    start_server "$1" "$4"
    c0=$(cg_usec); v0=$(vmq_usec)
    run_client "$2" "$3" "$4" "$WORK/one.json" "${5:-1}" || true
    wait_server "$SERVER_PID"
    c1=$(cg_usec); v1=$(vmq_usec)
    measure_of $((c1 - c0)) "$(usec_delta "$v0" "$v1")" "$WORK/one.json"
}

three_streams() { # client-ns, then 3 x (server-ns address port): summed
    local client=$1; shift
    local files=() addrs=() ports=() servers=() clients=() i c0 c1 v0 v1
    while [ $# -gt 0 ]; do
        start_server "$1" "$3"
        servers+=("$SERVER_PID")
        addrs+=("$2")
        ports+=("$3")
        files+=("$WORK/par${#files[@]}.json")
        shift 3
    done
    c0=$(cg_usec); v0=$(vmq_usec)
    # Every server listens: the clients start together.
    for i in "${!files[@]}"; do
        run_client "$client" "${addrs[$i]}" "${ports[$i]}" "${files[$i]}" &
        clients+=($!)
    done
    for pid in "${clients[@]}"; do wait "$pid" || true; done
    for pid in "${servers[@]}"; do wait_server "$pid"; done
    c1=$(cg_usec); v1=$(vmq_usec)
    measure_of $((c1 - c0)) "$(usec_delta "$v0" "$v1")" "${files[@]}"
}

# ----------------------------------------------------------------------------------------------
# Topologies. (a): two hosts per MTU, the same addresses behind every switch (10.77.1.0/24 for
# MTU 1500, 10.77.2.0/24 for 9000); host NAME = interface NAME = ${P}<s><t><i>, s = v (vmq),
# b (Linux bridge), o (OVS); t = a (1500) or j (9000); i = 1, 2.

RESULTS="$WORK/results.txt"   # lines: key gbps cpu_s bytes vmq_cpu_s
: > "$RESULTS"

record() { # key "gbps cpu_s bytes vmq_cpu_s"
    local gbps cpu bytes vcpu own=""
    read -r gbps cpu bytes vcpu <<<"$2"
    echo "$1 $gbps $cpu $bytes $vcpu" >> "$RESULTS"
    [ "$vcpu" = - ] || own=", vmq alone $(python3 -c "print(f'{$vcpu / ($bytes / 1e9):.3f}')")"
    log "  $1: $gbps Gbit/s, $(python3 -c "print(f'{$cpu / ($bytes / 1e9):.3f}')") CPU-s/GB (cgroup)$own"
}

mtu_tag() { [ "$1" = 1500 ] && echo a || echo j; }
subnet_of() { [ "$1" = 1500 ] && echo 1 || echo 2; }

# Veth pairs from hosts ${P}<s><t>1/2 into the switch namespace SWNS (names ${P}p<s><t>i there).
veth_hosts() { # s SWNS
    local s=$1 swns=$2 mtu tag i ns
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu")
        for i in 1 2; do
            ns="${P}${s}${tag}$i"
            mkns "$ns"
            ip link add "$ns" netns "$ns" mtu "$mtu" type veth peer name "${P}p${s}${tag}$i" netns "$swns" mtu "$mtu"
            ip -n "$swns" link set "${P}p${s}${tag}$i" up
            ip -n "$ns" link set "$ns" up
            ip -n "$ns" addr add "10.77.$(subnet_of "$mtu").$i/24" dev "$ns"
        done
    done
}

setup_bridge() {
    mkns "${P}-br"
    veth_hosts b "${P}-br"
    local mtu tag br i
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu") br="${P}br$([ "$mtu" = 1500 ] && echo 15 || echo 90)"
        ip -n "${P}-br" link add "$br" type bridge
        ip -n "${P}-br" link set "$br" mtu "$mtu" up
        for i in 1 2; do ip -n "${P}-br" link set "${P}pb${tag}$i" master "$br"; done
    done
}

setup_ovs() {
    mkns "${P}-ovs"
    veth_hosts o "${P}-ovs"
    start_ovsdb
    local mtu tag br i
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu") br="${P}o$([ "$mtu" = 1500 ] && echo 15 || echo 90)"
        "${VSCTL[@]}" --no-wait add-br "$br" -- set bridge "$br" datapath_type=netdev
        for i in 1 2; do
            "${VSCTL[@]}" --no-wait add-port "$br" "${P}po${tag}$i" -- set Interface "${P}po${tag}$i" "mtu_request=$mtu"
        done
    done
}

vmq_a_config() { # offloads: true|false
    printf '[switch]\nmode = "vmq"\nworkers = 2\n\n'
    local mtu tag i
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu")
        for i in 1 2; do
            tap_port "v$tag$i" "${P}v$tag$i" "${P}v$tag$i" "02:00:00:00:$([ "$mtu" = 1500 ] && echo 0a || echo 0b):0$i" "$mtu" "$1"
        done
    done
}

setup_vmq_a() {
    local mtu i
    for mtu in $MTUS; do for i in 1 2; do mkns "${P}v$(mtu_tag "$mtu")$i"; done; done
}

address_vmq_a() {
    local mtu tag i
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu")
        for i in 1 2; do ip -n "${P}v$tag$i" addr add "10.77.$(subnet_of "$mtu").$i/24" dev "${P}v$tag$i"; done
    done
}

# Brings system $1 up with offloads $2 (on|off); hosts' offloads set accordingly.
switch_up() {
    local sys=$1 offl=$2 s mtu tag i
    case "$sys" in
        vmq) start_vmq "$(vmq_a_config "$([ "$offl" = on ] && echo true || echo false)")"; address_vmq_a; s=v ;;
        bridge) s=b ;;
        ovs) start_vswitchd "$([ "$offl" = on ] && echo true || echo false)"; s=o ;;
    esac
    for mtu in $MTUS; do
        tag=$(mtu_tag "$mtu")
        for i in 1 2; do set_endpoint_offloads "${P}$s$tag$i" "${P}$s$tag$i" "$offl"; done
        # Forwarding: a full-size ping crosses (the switch is up, its ports too, the MTU holds).
        wait_for ip netns exec "${P}$s${tag}1" ping -c 1 -W 1 -M do -s $((mtu - 28)) "10.77.$(subnet_of "$mtu").2" \
            || { log "$sys does not forward at MTU $mtu"; [ "$sys" = ovs ] && tail -20 "$OVSDIR/ovs-vswitchd.log" >&2; return 1; }
    done
}

switch_down() {
    case "$1" in
        vmq) stop_vmq ;;
        ovs) stop_vswitchd ;;
        bridge) ;;
    esac
}

# (b) external host ${P}-ext (10.77.3.100) on a veth into ${P}-sw, where vmq's uplink is; VMs
# ${P}m1..3 (10.77.3.1..3) on TAP ports.
setup_b() {
    mkns "${P}-sw"
    mkns "${P}-ext"
    ip link add "${P}up" netns "${P}-sw" type veth peer name "${P}ext" netns "${P}-ext"
    ip -n "${P}-sw" link set "${P}up" up
    ip -n "${P}-ext" link set "${P}ext" up
    ip -n "${P}-ext" addr add 10.77.3.100/24 dev "${P}ext"
    for i in 1 2 3; do mkns "${P}m$i"; done
}

vmq_b_config() { # mode [driver]
    printf '[switch]\nmode = "%s"\nworkers = 2\n\n' "$1"
    printf '[[port]]\nname = "up0"\nkind = "uplink"\nifname = "%s"\nnetns = "%s"\n' "${P}up" "${P}-sw"
    [ "${2:-af_packet}" = af_xdp ] && printf 'driver = "af_xdp"\nxdp_mode = "%s"\n' "$XDP_MODE"
    printf '\n'
    for i in 1 2 3; do tap_port "vm$i" "${P}m$i" "${P}m$i" "02:00:00:00:0c:0$i" 1500; done
}

address_b() {
    for i in 1 2 3; do ip -n "${P}m$i" addr add "10.77.3.$i/24" dev "${P}m$i"; done
}

# (c) 64-byte frames: dpdk-testpmd in ${P}-ext sends to the VMs' MACs (one net_af_packet port
# per VM, all on the external veth), vmq's counters and CPU are read around a fixed window.

VM_MACS=(02:00:00:00:0c:01 02:00:00:00:0c:02 02:00:00:00:0c:03)

start_generator() {
    local args=() peers=() i
    for i in "${!VM_MACS[@]}"; do
        args+=(--vdev "net_af_packet$i,iface=${P}ext")
        peers+=("--eth-peer=$i,${VM_MACS[$i]}")
    done
    # Main lcore on CPU 0, the forwarding lcore on CPU 1; no hugepages (malloc'd memory);
    # --stats-period keeps it forwarding (without a terminal) until SIGINT.
    incg ip netns exec "${P}-ext" dpdk-testpmd --no-huge -m 256 --no-pci --file-prefix "$GEN_PREFIX" -l 0,1 \
        "${args[@]}" -- --total-num-mbufs=16384 --forward-mode=txonly --port-topology=loop --nb-cores=1 \
        "${peers[@]}" --txpkts=64 --tx-ip=10.77.3.100,10.77.3.1 --stats-period 1 -a --no-lsc-interrupt \
        >>"$WORK/generator.log" 2>&1 &
    GEN_PID=$!
    # Sending: the external veth's transmit counter moves.
    local t0
    t0=$(sent_frames)
    if ! WAIT_S=30 wait_for sh -c "[ \$(ip netns exec ${P}-ext cat /sys/class/net/${P}ext/statistics/tx_packets) -gt $((t0 + 1000)) ]"; then
        log "the generator does not send:"; tail -20 "$WORK/generator.log" >&2; return 1
    fi
}

stop_generator() {
    [ -n "$GEN_PID" ] || return 0
    kill -INT "$GEN_PID" 2>/dev/null || true
    local deadline=$(( $(date +%s) + 10 ))
    while alive "$GEN_PID" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$GEN_PID" 2>/dev/null || true
    wait "$GEN_PID" 2>/dev/null || true
    GEN_PID=""
    rm -rf "/var/run/dpdk/$GEN_PREFIX"
}

sent_frames() { ip netns exec "${P}-ext" cat "/sys/class/net/${P}ext/statistics/tx_packets"; }

pid_usec() { # PID: its CPU time so far (utime + stime), µs
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%d\n", ($12 + $13) * 1e6 / hz }' "/proc/$1/stat"
}

# frames_snapshot: "uptime_ns vm_tx_packets uplink_rx_packets uplink_kernel_drops drops vmq_usec gen_usec sent"
frames_snapshot() {
    local stats vu gu sent
    stats=$("$VMQ" ctl --socket "$WORK/vmq.sock" --json stats)
    vu=$(vmq_usec); gu=$(pid_usec "$GEN_PID"); sent=$(sent_frames)
    python3 -c '
import json, sys
r = json.load(sys.stdin)
if not r.get("ok"):
    sys.exit(f"vmq ctl stats: {r}")
s = r["result"]
vm = sum(p["tx_packets"] for p in s["ports"] if p["port"].startswith("vm"))
up = next(p for p in s["ports"] if p["port"] == "up0")
drops = sum(sum(p["drops"].values()) for p in s["ports"])
print(s["uptime_ns"], vm, up["rx_packets"], up["kernel_drops"], drops, *sys.argv[1:])' "$vu" "$gu" "$sent" <<<"$stats"
}

FRAMES="$WORK/frames.txt"   # lines: key seconds delivered vmq_cpu_s gen_cpu_s sent uplink_rx kernel_drops drops
: > "$FRAMES"

measure_frames() { # mode driver: one run, appended to $FRAMES
    local mode=$1 driver=$2 key a b
    key="c:$mode:64"
    if [ "$driver" = af_xdp ]; then key="c:$mode+af_xdp:64"; fi
    start_vmq "$(vmq_b_config "$mode" "$driver")"
    start_generator
    sleep 1   # warm-up: rings and caches filled, the rebalancer has seen the rates
    a=$(frames_snapshot)
    if [ -n "${PERF_DIR:-}" ]; then
        # The measurement window, sampled: where vmq's own CPU time goes in this mode.
        perf record -q -F 999 -g -p "$VMQ_PID" -o "$PERF_DIR/perf-${key//[:+]/-}.data" -- sleep "$SECONDS_PER_RUN" \
            >/dev/null 2>&1 || log "  perf record failed (profile of $key missing)"
    else
        sleep "$SECONDS_PER_RUN"   # the measurement window
    fi
    b=$(frames_snapshot)
    stop_generator
    stop_vmq
    python3 - "$key" $a $b >> "$FRAMES" <<'PY'
import sys
key, v = sys.argv[1], [int(x) for x in sys.argv[2:]]
a, b = v[:8], v[8:]
d = [y - x for x, y in zip(a, b)]
secs, delivered = d[0] / 1e9, d[1]
if delivered <= 0:
    sys.exit(f"{key}: vmq delivered no frame to the VMs")
print(key, f"{secs:.6f}", delivered, f"{d[5] / 1e6:.3f}", f"{d[6] / 1e6:.3f}", d[7], d[2], d[3], d[4])
PY
    read -r _ secs delivered vcpu gcpu sent uprx kdrops drops < <(tail -1 "$FRAMES")
    log "  $key: $(python3 -c "print(f'{$delivered / $secs / 1e6:.3f} Mpps delivered ({$sent / $secs / 1e6:.3f} sent, {$uprx / $secs / 1e6:.3f} received by vmq), vmq {$vcpu / ($delivered / 1e6):.3f} CPU-s per million frames, generator {$gcpu:.2f} CPU-s')")"
}

# ----------------------------------------------------------------------------------------------

has_part() { [[ " $PARTS " == *" $1 "* ]]; }
has_system() { [[ " $SYSTEMS " == *" $1 "* ]]; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "vmq: $VMQ; $ROUNDS round(s) of ${SECONDS_PER_RUN}s; systems: $SYSTEMS; MTUs: $MTUS; offloads: $OFFLOADS; streams: $STREAMS; load average before: $LOAD_BEFORE"
if has_part a; then
    has_system bridge && setup_bridge
    has_system vmq && setup_vmq_a
    has_system ovs && setup_ovs
fi
if has_part b || has_part c; then setup_b; fi

read -r -a SYSTEM_LIST <<<"$SYSTEMS"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS"
    if has_part a; then
        # The switches take turns going first: round r starts with the (r-1)th.
        n=${#SYSTEM_LIST[@]}
        for k in $(seq 0 $((n - 1))); do
            sys=${SYSTEM_LIST[$(( (k + round - 1) % n ))]}
            for offl in $OFFLOADS; do
                switch_up "$sys" "$offl"
                for mtu in $MTUS; do
                    tag=$(mtu_tag "$mtu")
                    s=$(case "$sys" in vmq) echo v ;; bridge) echo b ;; ovs) echo o ;; esac)
                    for st in $STREAMS; do
                        perf_pid=""
                        if [ -n "${PERF_DIR:-}" ] && [ "$sys" = vmq ] && [ -n "$VMQ_PID" ]; then
                            perf record -q -F 999 -g -p "$VMQ_PID" -o "$PERF_DIR/perf-a-vmq-$mtu-$offl-$st.data" \
                                -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
                            perf_pid=$!
                        fi
                        v=$(one_stream "${P}$s${tag}2" "${P}$s${tag}1" "10.77.$(subnet_of "$mtu").2" 5201 "$st")
                        [ -z "$perf_pid" ] || wait "$perf_pid" || log "  perf record failed"
                        record "a:$sys:$mtu:$offl:$st" "$v"
                    done
                done
                switch_down "$sys"
            done
        done
    fi
    if has_part b; then
        order="vmq switch"
        [ $((round % 2)) = 0 ] && order="switch vmq"
        for mode in $order; do
            for driver in $DRIVERS; do
                start_vmq "$(vmq_b_config "$mode" "$driver")"
                address_b
                v=$(three_streams "${P}-ext" "${P}m1" 10.77.3.1 5211 "${P}m2" 10.77.3.2 5212 "${P}m3" 10.77.3.3 5213)
                sys=$mode
                [ "$driver" = af_xdp ] && sys="$mode+af_xdp"
                record "b:$sys:1500:on:3" "$v"
                stop_vmq
            done
        done
    fi
    if has_part c; then
        # Round r runs the (mode, driver) pairs forwards when odd, backwards when even.
        pairs=()
        for mode in vmq switch; do for driver in $DRIVERS; do pairs+=("$mode $driver"); done; done
        n=${#pairs[@]}
        for k in $(seq 0 $((n - 1))); do
            if [ $((round % 2)) = 0 ]; then k=$((n - 1 - k)); fi
            read -r mode driver <<<"${pairs[$k]}"
            measure_frames "$mode" "$driver"
        done
    fi
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p bench/results
[ -n "$OUT" ] || OUT="bench/results/netns-tcp-$(date -u +%Y%m%d-%H%M%S).json"

python3 - "$RESULTS" "$OUT" "$ROUNDS" "$SECONDS_PER_RUN" "$QUICK" "$LOAD_BEFORE" "$LOAD_AFTER" "$VMQ" "$ARGS" "$([ -n "$CG" ] && echo 1 || echo 0)" "$FRAMES" "$XDP_MODE" <<'PY'
import json, platform, statistics, subprocess, sys, datetime
results_file, out, rounds, secs, quick, load_before, load_after, vmq, args, have_cg, frames_file, xdp_mode = sys.argv[1:]
groups = {}
for line in open(results_file):
    key, gbps, cpu, nbytes, vcpu = line.split()
    gb = int(nbytes) / 1e9
    groups.setdefault(key, []).append({"gbps": float(gbps), "cpu_s": float(cpu), "bytes": int(nbytes),
                                       "cpu_s_per_gb": float(cpu) / gb if have_cg == "1" else None,
                                       "vmq_cpu_s": None if vcpu == "-" else float(vcpu),
                                       "vmq_cpu_s_per_gb": None if vcpu == "-" else float(vcpu) / gb})
measurements = []
for key, runs in groups.items():
    part, system, mtu, offl, streams = key.split(":")
    cpg = [r["cpu_s_per_gb"] for r in runs if r["cpu_s_per_gb"] is not None]
    vpg = [r["vmq_cpu_s_per_gb"] for r in runs if r["vmq_cpu_s_per_gb"] is not None]
    measurements.append({
        "key": key, "part": part, "system": system, "mtu": int(mtu), "offloads": offl == "on",
        "streams": int(streams), "runs": runs,
        "median_gbps": statistics.median(r["gbps"] for r in runs),
        "median_cpu_s_per_gb": statistics.median(cpg) if cpg else None,
        # The vmq process alone (/proc/PID/stat utime + stime); None where vmq was not the switch.
        "median_vmq_cpu_s_per_gb": statistics.median(vpg) if vpg else None,
    })
med = {m["key"]: m for m in measurements}

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
names = {"vmq": "vmq", "bridge": "Linux bridge", "ovs": "OVS userspace (netdev)", "vmq-mode": "vmq mode", "switch": "switch mode"}
comparisons = []
for m in measurements:
    if m["part"] != "a" or m["system"] != "vmq":
        continue
    for peer, (target_on, target_off) in (("bridge", (1.0, 1.0)), ("ovs", (1.4, 3.0))):
        b = med.get(f"a:{peer}:{m['mtu']}:{'on' if m['offloads'] else 'off'}:{m['streams']}")
        if not b:
            continue
        r = m["median_gbps"] / b["median_gbps"] if b["median_gbps"] else None
        target = target_on if m["offloads"] else target_off
        comparisons.append({"test": f"netns TCP, {m['streams']} stream(s), MTU {m['mtu']}, offloads {'on' if m['offloads'] else 'off'}",
                            "a": "vmq", "a_median_gbps": m["median_gbps"], "b": names[peer], "b_median_gbps": b["median_gbps"],
                            "ratio": r, "target": target, "target_met": r is not None and r >= target,
                            "a_cpu_s_per_gb": m["median_cpu_s_per_gb"], "b_cpu_s_per_gb": b["median_cpu_s_per_gb"]})
if "b:vmq:1500:on:3" in med and "b:switch:1500:on:3" in med:
    a, b = med["b:vmq:1500:on:3"], med["b:switch:1500:on:3"]
    r = a["median_gbps"] / b["median_gbps"] if b["median_gbps"] else None
    comparisons.append({"test": "external -> 3 VMs, 3 streams, 2 workers", "a": "vmq mode", "a_median_gbps": a["median_gbps"],
                        "b": "switch mode", "b_median_gbps": b["median_gbps"], "ratio": r, "target": 1.5,
                        "target_met": r is not None and r >= 1.5,
                        "a_cpu_s_per_gb": a["median_cpu_s_per_gb"], "b_cpu_s_per_gb": b["median_cpu_s_per_gb"],
                        "a_vmq_cpu_s_per_gb": a["median_vmq_cpu_s_per_gb"], "b_vmq_cpu_s_per_gb": b["median_vmq_cpu_s_per_gb"]})
# AF_XDP against AF_PACKET uplinks: GB per CPU-second (the inverse of CPU per GB) of every
# process of the measurement; the issue's goal is 1.5x.
for mode in ("vmq", "switch"):
    a, b = med.get(f"b:{mode}+af_xdp:1500:on:3"), med.get(f"b:{mode}:1500:on:3")
    if a and b and a["median_cpu_s_per_gb"] and b["median_cpu_s_per_gb"]:
        r = b["median_cpu_s_per_gb"] / a["median_cpu_s_per_gb"]
        comparisons.append({"test": f"external -> 3 VMs, {mode} mode, GB per CPU-s", "a": "AF_XDP uplink",
                            "a_median_gbps": a["median_gbps"], "b": "AF_PACKET uplink", "b_median_gbps": b["median_gbps"],
                            "ratio": r, "target": 1.5, "target_met": r >= 1.5,
                            "a_cpu_s_per_gb": a["median_cpu_s_per_gb"], "b_cpu_s_per_gb": b["median_cpu_s_per_gb"],
                            "a_vmq_cpu_s_per_gb": a["median_vmq_cpu_s_per_gb"], "b_vmq_cpu_s_per_gb": b["median_vmq_cpu_s_per_gb"]})
# CPU per GB with offloads on against off, per system (the 80% target is vmq's).
savings = []
for m in measurements:
    if m["part"] == "a" and m["offloads"]:
        off = med.get(f"a:{m['system']}:{m['mtu']}:off:{m['streams']}")
        if off and m["median_cpu_s_per_gb"] and off["median_cpu_s_per_gb"]:
            s = 1 - m["median_cpu_s_per_gb"] / off["median_cpu_s_per_gb"]
            savings.append({"system": m["system"], "mtu": m["mtu"], "streams": m["streams"],
                            "cpu_s_per_gb_on": m["median_cpu_s_per_gb"], "cpu_s_per_gb_off": off["median_cpu_s_per_gb"],
                            "gbps_on": m["median_gbps"], "gbps_off": off["median_gbps"],
                            "saving": s, "target": 0.8 if m["system"] == "vmq" else None,
                            "target_met": (s >= 0.8) if m["system"] == "vmq" else None})
# (c) 64-byte frames: per (mode, driver), every run and medians.
fgroups = {}
for line in open(frames_file):
    key, fsecs, delivered, vcpu, gcpu, sent, uprx, kdrops, drops = line.split()
    fsecs, delivered, vcpu, gcpu = float(fsecs), int(delivered), float(vcpu), float(gcpu)
    fgroups.setdefault(key, []).append({
        "seconds": fsecs, "delivered": delivered, "sent": int(sent), "uplink_rx": int(uprx),
        "uplink_kernel_drops": int(kdrops), "vmq_drops": int(drops),
        "mpps": delivered / fsecs / 1e6, "sent_mpps": int(sent) / fsecs / 1e6,
        "vmq_cpu_s": vcpu, "generator_cpu_s": gcpu,
        # CPU-seconds per million frames delivered: vmq alone, and vmq + the generator.
        "vmq_cpu_s_per_mframe": vcpu / (delivered / 1e6),
        "total_cpu_s_per_mframe": (vcpu + gcpu) / (delivered / 1e6),
    })
frames = []
for key, runs in fgroups.items():
    _, system, size = key.split(":")
    mode, _, driver = system.partition("+")
    frames.append({"key": key, "system": system, "mode": mode, "driver": driver or "af_packet",
                   "frame_bytes": int(size), "runs": runs,
                   "median_mpps": statistics.median(r["mpps"] for r in runs),
                   "median_sent_mpps": statistics.median(r["sent_mpps"] for r in runs),
                   "median_vmq_cpu_s_per_mframe": statistics.median(r["vmq_cpu_s_per_mframe"] for r in runs),
                   "median_total_cpu_s_per_mframe": statistics.median(r["total_cpu_s_per_mframe"] for r in runs)})
fmed = {f["system"]: f for f in frames}
frame_comparisons = []
for mode in ("vmq", "switch"):
    a, b = fmed.get(f"{mode}+af_xdp"), fmed.get(mode)
    if a and b:
        # Frames per vmq CPU-second, AF_XDP over AF_PACKET (the inverse ratio of CPU per frame).
        r = b["median_vmq_cpu_s_per_mframe"] / a["median_vmq_cpu_s_per_mframe"]
        frame_comparisons.append({"test": f"64 B external -> 3 VMs, {mode} mode, frames per vmq CPU-s",
                                  "a": "AF_XDP uplink", "b": "AF_PACKET uplink", "ratio": r, "target": 1.5,
                                  "target_met": r >= 1.5, "a_median_mpps": a["median_mpps"], "b_median_mpps": b["median_mpps"],
                                  "mpps_ratio": a["median_mpps"] / b["median_mpps"],
                                  "total_ratio": b["median_total_cpu_s_per_mframe"] / a["median_total_cpu_s_per_mframe"]})
for driver in ("", "+af_xdp"):
    a, b = fmed.get(f"vmq{driver}"), fmed.get(f"switch{driver}")
    if a and b:
        # vmq CPU per frame, vmq mode over switch mode: the goal is at most 0.7.
        r = a["median_vmq_cpu_s_per_mframe"] / b["median_vmq_cpu_s_per_mframe"]
        frame_comparisons.append({"test": f"64 B external -> 3 VMs, {'AF_XDP' if driver else 'AF_PACKET'} uplink, vmq CPU per frame",
                                  "a": "vmq mode", "b": "switch mode", "ratio": r, "target": 0.7,
                                  "target_met": r <= 0.7, "a_median_mpps": a["median_mpps"], "b_median_mpps": b["median_mpps"],
                                  "mpps_ratio": a["median_mpps"] / b["median_mpps"],
                                  "total_ratio": a["median_total_cpu_s_per_mframe"] / b["median_total_cpu_s_per_mframe"]})
report = {
    "benchmark": "netns-tcp",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": ("bench/netns-tcp.sh " + args).strip(),
    "machine": {"cpus": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
                "cpu": cpu, "kernel": platform.release(),
                "load_average_before": load_before, "load_average_after": load_after},
    "settings": {"rounds": int(rounds), "seconds_per_run": float(secs), "quick": quick == "1",
                 "vmq_workers": 2, "vmq": vmq, "xdp_mode": xdp_mode, "cpu_accounting": "cgroup v2 cpu.stat" if have_cg == "1" else None,
                 "vmq_cpu_accounting": "/proc/PID/stat utime + stime of the vmq process"},
    "measurements": measurements,
    "comparisons": comparisons,
    "offload_cpu_saving": savings,
    "frames_64": frames,
    "frames_64_comparisons": frame_comparisons,
}
print()
print(f"netns TCP ({rounds} round(s) of {secs} s, medians; load {load_before} -> {load_after})")
if measurements:
    print("CPU-s/GB: every process of the measurement (cgroup: the switch and the iperf3 endpoints); vmq: its process alone")
    print(f"{'system':<8} {'MTU':>5} {'offl':>4} {'str':>3} {'Gbit/s':>7} {'CPU-s/GB':>9} {'vmq':>6}  runs (Gbit/s)")
fmt = lambda c, w: f"{(f'{c:.3f}' if c is not None else '-'):>{w}}"
for m in sorted(measurements, key=lambda m: (m["part"], m["mtu"], not m["offloads"], m["streams"], m["system"])):
    print(f"{m['system']:<8} {m['mtu']:>5} {'on' if m['offloads'] else 'off':>4} {m['streams']:>3} {m['median_gbps']:>7.2f} "
          f"{fmt(m['median_cpu_s_per_gb'], 9)} {fmt(m['median_vmq_cpu_s_per_gb'], 6)}  {', '.join('%.2f' % r['gbps'] for r in m['runs'])}")
print()
for c in comparisons:
    print(f"{c['test']:<48} {c['a']} / {c['b']}: {c['ratio']:.2f}x (target {c['target']}x: {'met' if c['target_met'] else 'MISSED'})")
for s in savings:
    t = f" (target 80%: {'met' if s['target_met'] else 'MISSED'})" if s["target"] else ""
    print(f"CPU per GB, offloads on vs off, {s['system']}, MTU {s['mtu']}, {s['streams']} stream(s): "
          f"{s['cpu_s_per_gb_on']:.3f} vs {s['cpu_s_per_gb_off']:.3f} s/GB, {100 * s['saving']:.0f}% less{t}")
if frames:
    print()
    print("64-byte frames, external -> 3 VMs (medians). CPU-s/Mf: CPU-seconds per million frames delivered;")
    print("vmq: its process alone; +gen: with the generator (which also pays the kernel's receive softirq)")
    print(f"{'system':<14} {'Mpps':>6} {'sent':>6} {'vmq CPU-s/Mf':>12} {'+gen':>6}  runs (Mpps)")
    order = {"vmq": 0, "vmq+af_xdp": 1, "switch": 2, "switch+af_xdp": 3}
    for f in sorted(frames, key=lambda f: order.get(f["system"], 9)):
        print(f"{f['system']:<14} {f['median_mpps']:>6.3f} {f['median_sent_mpps']:>6.3f} {f['median_vmq_cpu_s_per_mframe']:>12.3f} "
              f"{f['median_total_cpu_s_per_mframe']:>6.3f}  {', '.join('%.3f' % r['mpps'] for r in f['runs'])}")
    for c in frame_comparisons:
        cmp = ">=" if c["target"] > 1 else "<="
        print(f"{c['test']:<60} {c['a']} / {c['b']}: {c['ratio']:.2f}x (goal {cmp} {c['target']}x: {'met' if c['target_met'] else 'MISSED'})")
json.dump(report, open(out, "w"), indent=2)
print(f"\nresults: {out}")
PY
