#!/usr/bin/env python3
"""Checks `vmq bench --json` for correctness, never speed (no figure is asserted).

usage: bench-smoke.py BENCH_JSON VMS QUEUES

Every (mode, path, frame length) of the default run is there exactly once, delivered frames and
dropped none; in vmq mode every VM has a queue (VMS <= QUEUES) and nothing takes the default
queue, in switch mode everything does; the four VM-to-VM TCP cases are there, delivered payload,
and the offload counters show what each case does (segmentation only where the receiver lacks
GSO, coalescing only for MSS segments toward a GSO receiver); the machine is named.
"""
import json
import math
import sys


def check(report, vms, queues):
    machine = report.get("machine") or {}
    assert machine.get("cpu") and machine.get("kernel"), f"no CPU model or kernel: {machine}"
    assert report["memcpy_gbps"] > 0, report["memcpy_gbps"]
    results = report["results"]
    expected = {(m, p, l) for m in ("vmq", "switch") for p in ("uplink-to-vm", "vm-to-vm") for l in (64, 1518, 9018)}
    got = [(r["mode"], r["path"], r["frame_len"]) for r in results]
    assert sorted(got) == sorted(expected), f"results {sorted(got)}, expected {sorted(expected)}"
    for r in results:
        assert r["delivered"] > 0, f"nothing delivered: {r}"
        assert r["drops"] == 0, f"drops: {r}"
        assert r["worker_cpu_ns"] > 0, f"no worker CPU time accounted: {r}"
        if r["path"] == "uplink-to-vm":
            if r["mode"] == "vmq":
                assert r["vms_with_queue"] == min(vms, queues), f"VMs with a queue: {r}"
                assert r["default_queue_frames"] == 0, f"vmq mode used the default queue: {r}"
            else:
                assert r["vms_with_queue"] == 0 and r["default_queue_frames"] > 0, f"switch mode: {r}"
    tcp = {t["case"]: t for t in report["tcp"]}
    assert sorted(tcp) == sorted(["offloads-on", "segment-in-vmq", "offloads-off", "rsc"]), sorted(tcp)
    for t in tcp.values():
        assert t["frames"] > 0 and t["payload_gbps"] > 0, f"TCP delivered nothing: {t}"
        cost = t["cpu_ns_per_kib"]
        assert cost is not None and math.isfinite(cost) and cost > 0, f"no CPU cost: {t}"
    for case in ("offloads-on", "offloads-off"):
        assert tcp[case]["segments"] == 0 and tcp[case]["coalesced"] == 0, f"no offload work expected: {tcp[case]}"
    assert tcp["segment-in-vmq"]["segments"] > 0 and tcp["segment-in-vmq"]["coalesced"] == 0, tcp["segment-in-vmq"]
    assert tcp["rsc"]["coalesced"] > 0 and tcp["rsc"]["segments"] == 0, tcp["rsc"]
    return len(results), len(tcp)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    with open(sys.argv[1]) as f:
        report = json.load(f)
    try:
        n, t = check(report, int(sys.argv[2]), int(sys.argv[3]))
    except AssertionError as e:
        print(f"bench smoke FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"bench smoke: {n} results and {t} TCP cases, all delivered, no drops, offload counters as expected")
