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
# Every measurement is repeated (default 3 rounds, A and B alternating within a round) and the
# median is reported. Prints a table; writes bench/results/netns-tcp-<date>.json.
#
# Root only. Everything runs in namespaces this script creates (prefix vqnb) and removes on
# exit, also on failure or Ctrl-C; traffic never leaves them.
#
# usage: bench/netns-tcp.sh [--quick] [--rounds N] [--seconds S] [--vmq PATH] [--out FILE]
set -euo pipefail
shopt -s inherit_errexit

cd "$(dirname "$0")/.."
ROUNDS=3
SECONDS_PER_RUN=10
VMQ=""
OUT=""
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; ROUNDS=1; SECONDS_PER_RUN=2 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --seconds) SECONDS_PER_RUN="$2"; shift ;;
        --vmq) VMQ="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
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
for tool in ip iperf3 python3 ss timeout; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done

P=vqnb                       # prefix of every namespace and interface made here
WORK=$(mktemp -d /tmp/vqnb.XXXXXX)
NAMESPACES=()
VMQ_PID=""

log() { printf '%s\n' "$*" >&2; }

cleanup() {
    set +e
    stop_vmq
    # iperf3 servers and clients this script started: the processes in its namespaces.
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null; done
    done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$WORK"
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
    RUST_LOG=warn "$VMQ" run --config "$WORK/vmq.toml" >>"$WORK/vmq.log" 2>&1 &
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

tap_port() { # name ifname netns mac mtu
    printf '[[port]]\nname = "%s"\nkind = "tap"\nifname = "%s"\nnetns = "%s"\nmac = "%s"\nmtu = %s\n\n' "$@"
}

# ----------------------------------------------------------------------------------------------
# iperf3

listening() { ip netns exec "$1" ss -Hltn "sport = :$2" | grep -q .; }

# start_server NS PORT: a one-off iperf3 server; its PID in SERVER_PID.
start_server() {
    ip netns exec "$1" iperf3 -s -1 -p "$2" >/dev/null 2>&1 &
    SERVER_PID=$!
    wait_for listening "$1" "$2"
}

run_client() { # ns address port outfile
    timeout $(( SECONDS_PER_RUN + 30 )) ip netns exec "$1" \
        iperf3 -c "$2" -p "$3" -t "$SECONDS_PER_RUN" --connect-timeout 5000 -J > "$4"
}

gbps_of() { # iperf3 JSON files...: summed receiver Gbit/s
    python3 - "$@" <<'PY'
import json, sys
total = 0.0
for f in sys.argv[1:]:
    r = json.load(open(f))
    if "error" in r:
        sys.exit(f"iperf3: {r['error']}")
    total += r["end"]["sum_received"]["bits_per_second"]
print(f"{total / 1e9:.3f}")
PY
}

one_stream() { # server-ns client-ns address port
    start_server "$1" "$4"
    run_client "$2" "$3" "$4" "$WORK/one.json"
    wait "$SERVER_PID" 2>/dev/null || true
    gbps_of "$WORK/one.json"
}

three_streams() { # client-ns, then 3 x (server-ns address port): summed Gbit/s
    local client=$1; shift
    local files=() addrs=() ports=() servers=() clients=() i
    while [ $# -gt 0 ]; do
        start_server "$1" "$3"
        servers+=("$SERVER_PID")
        addrs+=("$2")
        ports+=("$3")
        files+=("$WORK/par${#files[@]}.json")
        shift 3
    done
    # Every server listens: the clients start together.
    for i in "${!files[@]}"; do
        run_client "$client" "${addrs[$i]}" "${ports[$i]}" "${files[$i]}" &
        clients+=($!)
    done
    for pid in "${clients[@]}"; do wait "$pid"; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    gbps_of "${files[@]}"
}

# ----------------------------------------------------------------------------------------------
# Topologies

declare -A RESULTS   # key -> space-separated Gbit/s per round

record() { RESULTS[$1]="${RESULTS[$1]:-} $2"; log "  $1: $2 Gbit/s"; }

# (a) vmq side: hosts ${P}va1/${P}va2 (MTU 1500, 10.77.1.0/24), ${P}vj1/${P}vj2 (MTU 9000,
# 10.77.2.0/24), TAP ports of one vmq. Bridge side: hosts ${P}ba1.. with the same addresses on
# veths into bridges ${P}br15 / ${P}br90 in namespace ${P}-br.
setup_bridge() {
    mkns "${P}-br"
    for mtu in 1500 9000; do
        local tag=$([ "$mtu" = 1500 ] && echo a || echo j) br="${P}br$([ "$mtu" = 1500 ] && echo 15 || echo 90)"
        ip -n "${P}-br" link add "$br" type bridge
        ip -n "${P}-br" link set "$br" mtu "$mtu" up
        for i in 1 2; do
            local ns="${P}b${tag}$i"
            mkns "$ns"
            ip link add "${P}b${tag}$i" netns "$ns" mtu "$mtu" type veth peer name "${P}p${tag}$i" netns "${P}-br" mtu "$mtu"
            ip -n "${P}-br" link set "${P}p${tag}$i" master "$br" up
            ip -n "$ns" link set "${P}b${tag}$i" up
            ip -n "$ns" addr add "10.77.$([ "$tag" = a ] && echo 1 || echo 2).$i/24" dev "${P}b${tag}$i"
        done
    done
}

vmq_a_config() {
    printf '[switch]\nmode = "vmq"\nworkers = 2\n\n'
    tap_port va1 "${P}va1" "${P}va1" 02:00:00:00:0a:01 1500
    tap_port va2 "${P}va2" "${P}va2" 02:00:00:00:0a:02 1500
    tap_port vj1 "${P}vj1" "${P}vj1" 02:00:00:00:0b:01 9000
    tap_port vj2 "${P}vj2" "${P}vj2" 02:00:00:00:0b:02 9000
}

setup_vmq_a() {
    for h in va1 va2 vj1 vj2; do mkns "${P}$h"; done
}

address_vmq_a() {
    ip -n "${P}va1" addr add 10.77.1.1/24 dev "${P}va1"
    ip -n "${P}va2" addr add 10.77.1.2/24 dev "${P}va2"
    ip -n "${P}vj1" addr add 10.77.2.1/24 dev "${P}vj1"
    ip -n "${P}vj2" addr add 10.77.2.2/24 dev "${P}vj2"
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

vmq_b_config() { # mode
    printf '[switch]\nmode = "%s"\nworkers = 2\n\n' "$1"
    printf '[[port]]\nname = "up0"\nkind = "uplink"\nifname = "%s"\nnetns = "%s"\n\n' "${P}up" "${P}-sw"
    for i in 1 2 3; do tap_port "vm$i" "${P}m$i" "${P}m$i" "02:00:00:00:0c:0$i" 1500; done
}

address_b() {
    for i in 1 2 3; do ip -n "${P}m$i" addr add "10.77.3.$i/24" dev "${P}m$i"; done
}

# ----------------------------------------------------------------------------------------------

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "vmq: $VMQ; $ROUNDS round(s) of ${SECONDS_PER_RUN}s; load average before: $LOAD_BEFORE"
setup_bridge
setup_vmq_a
setup_b

for round in $(seq 1 "$ROUNDS"); do
    log "round $round/$ROUNDS"
    # (a) A then B in odd rounds, B then A in even ones.
    order="vmq bridge"
    [ $((round % 2)) = 0 ] && order="bridge vmq"
    for side in $order; do
        if [ "$side" = vmq ]; then
            start_vmq "$(vmq_a_config)"
            address_vmq_a
            v=$(one_stream "${P}va2" "${P}va1" 10.77.1.2 5201); record a_vmq_1500 "$v"
            v=$(one_stream "${P}vj2" "${P}vj1" 10.77.2.2 5202); record a_vmq_9000 "$v"
            stop_vmq
        else
            v=$(one_stream "${P}ba2" "${P}ba1" 10.77.1.2 5201); record a_bridge_1500 "$v"
            v=$(one_stream "${P}bj2" "${P}bj1" 10.77.2.2 5202); record a_bridge_9000 "$v"
        fi
    done
    # (b)
    order="vmq switch"
    [ $((round % 2)) = 0 ] && order="switch vmq"
    for mode in $order; do
        start_vmq "$(vmq_b_config "$mode")"
        address_b
        v=$(three_streams "${P}-ext" "${P}m1" 10.77.3.1 5211 "${P}m2" 10.77.3.2 5212 "${P}m3" 10.77.3.3 5213)
        record "b_$mode" "$v"
        stop_vmq
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p bench/results
[ -n "$OUT" ] || OUT="bench/results/netns-tcp-$(date -u +%Y%m%d-%H%M%S).json"
{
    for key in "${!RESULTS[@]}"; do printf '%s%s\n' "$key" "${RESULTS[$key]}"; done
} > "$WORK/results.txt"

python3 - "$WORK/results.txt" "$OUT" "$ROUNDS" "$SECONDS_PER_RUN" "$QUICK" "$LOAD_BEFORE" "$LOAD_AFTER" "$VMQ" <<'PY'
import json, platform, statistics, subprocess, sys, datetime
results_file, out, rounds, secs, quick, load_before, load_after, vmq = sys.argv[1:]
runs = {}
for line in open(results_file):
    key, *values = line.split()
    runs[key] = [float(v) for v in values]
med = {k: statistics.median(v) for k, v in runs.items()}

def ratio(a, b):
    return med[a] / med[b] if med.get(b) else None

cpu = ""
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"):
            cpu = l.split(":", 1)[1].strip()
            break
except OSError:
    pass
rows = [
    ("netns TCP, 1 stream, MTU 1500", "vmq (vmq mode)", "a_vmq_1500", "Linux bridge", "a_bridge_1500", 0.8, 1.0),
    ("netns TCP, 1 stream, MTU 9000", "vmq (vmq mode)", "a_vmq_9000", "Linux bridge", "a_bridge_9000", 0.8, 1.0),
    ("external -> 3 VMs, 3 streams, 2 workers", "vmq mode", "b_vmq", "switch mode", "b_switch", 1.5, None),
]
report = {
    "benchmark": "netns-tcp",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {"cpus": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0),
                "cpu": cpu, "kernel": platform.release(),
                "load_average_before": load_before, "load_average_after": load_after},
    "settings": {"rounds": int(rounds), "seconds_per_run": float(secs), "quick": quick == "1",
                 "offloads": True, "vmq_workers": 2, "vmq": vmq},
    "runs_gbps": runs,
    "median_gbps": med,
    "comparisons": [],
}
print()
print(f"netns TCP: vmq vs Linux bridge ({rounds} round(s) of {secs} s, medians, Gbit/s; "
      f"load {load_before} -> {load_after})")
print(f"{'test':<42} {'A':<16} {'Gbit/s':>7}  {'B':<14} {'Gbit/s':>7}  {'A/B':>5}  target")
for name, a_name, a, b_name, b, target, goal in rows:
    if a not in med or b not in med:
        continue
    r = ratio(a, b)
    verdict = "met" if r is not None and r >= target else "MISSED"
    tgt = f">= {target}x" + (f" (goal {goal}x)" if goal else "")
    print(f"{name:<42} {a_name:<16} {med[a]:>7.2f}  {b_name:<14} {med[b]:>7.2f}  {r:>5.2f}  {tgt}: {verdict}")
    report["comparisons"].append({"test": name, "a": a_name, "a_median_gbps": med[a], "b": b_name,
                                  "b_median_gbps": med[b], "ratio": r, "target": target, "goal": goal,
                                  "target_met": r is not None and r >= target})
json.dump(report, open(out, "w"), indent=2)
print(f"\nresults: {out}")
PY
