#!/usr/bin/env python3
"""Control experiment for the live-migration corruption (README limits, docs/design.md).

Live-migrates a TCG guest back and forth between two QEMU processes on this machine, N moves,
while the guest writes memory hard and checks it, and stops at the first move whose guest came
out wrong. The same QEMU (7.2) flags, kernel and initramfs as crates/vmq/tests/migration.rs
(-accel tcg, -smp 1, -m 128M, q35, virtio-net-pci with vectors=0); the network device is what
the variant says:

  nonet-memfd  no network device (-nic none), RAM in a shared memfd (memory-backend-memfd,
               share=on, as with vhost-user): vmq is not involved at all;
  nonet-anon   no network device, plain anonymous RAM (QEMU's default);
  tap          QEMU's own virtio-net on a TAP device (vhost=off) in a bridge namespace with an
               external host: QEMU writes the RX buffers and logs them itself (no vmq);
  vmq          a vhost-user port on vmq A (source) / vmq B (destination), uplinks on veths into
               the same kind of bridge namespace (the migration test's topology).

With a network (tap, vmq) the external host pings the guest with 1400-byte echoes every 5 ms,
so RX buffers and used rings are written during the moves; with --stream it also sends the
migration test's TCP stream (every 4-byte word holds its offset, 64 KiB every 10 ms) to the
guest across each move, and the guest's SHA-256 of it is compared with the sender's (--keep:
the guest also writes it into a tmpfs file, as the test's `tee` does, replaced each move).

The guest workload (busybox, in the background, unless --no-cp): a reference file in tmpfs of
random bytes (--ref-mib, 16 by default) and its SHA-256 taken once; then forever: copy it to a
second file, hash the copy and the reference, compare both with the first hash (a mismatch is
appended to /tmp/bad), delete the copy, count the round in /tmp/iter. Pages the guest CPU
writes (the copy, freed and reused each round) and pages written once before the moves (the
reference) are both checked. After each move the script asks the guest for /tmp/iter, /tmp/bad
and the kernel's complaints (dmesg), requires the round counter to advance within 60 s, and
counts QEMU exiting (the guest panics with panic=-1 under -no-reboot) or a console that stops
answering as a failure. Kernel messages go to the console (printk 8), kept in --workdir.

On this 2-core host the copy workload and --stream together starve the guest (the receiver
did not finish within 90 s, also without a move): use --stream with --no-cp.

  bench/migration-control.py --variant nonet-memfd --moves 30
  bench/migration-control.py --variant vmq --moves 30 --vmq target/debug/vmq
  bench/migration-control.py --variant vmq --stream --no-cp --moves 30

Root only for tap and vmq (namespaces). Everything started is stopped by PID at the end.
Output: one line per move and a final line "RESULT variant=... moves_ok=.../N failure=...".
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

COMPLAINTS = r"Out of memory|corruption|BUG:|Oops|general protection|soft lockup|Kernel panic|unable to handle|segfault|RIP:"

WORKLOAD = (
    "dd if=/dev/urandom of=/tmp/ref bs=1048576 count={mib} 2>/dev/null; "
    "R=$(sha256sum /tmp/ref | cut -c1-64); echo $R > /tmp/ref.sum; echo 0 > /tmp/iter; "
    "(i=0; while :; do i=$((i+1)); cp /tmp/ref /tmp/w; "
    "h=$(sha256sum /tmp/w | cut -c1-64); [ \"$h\" = \"$R\" ] || echo \"round $i copy $h\" >> /tmp/bad; "
    "h=$(sha256sum /tmp/ref | cut -c1-64); [ \"$h\" = \"$R\" ] || echo \"round $i ref $h\" >> /tmp/bad; "
    "rm /tmp/w; echo $i > /tmp/iter; done) > /dev/null 2>&1 &"
)


SENDER = """
import array, hashlib, socket, sys, threading, time
s = socket.create_connection(("10.75.0.1", 5001), 10)
s.settimeout(60)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
h, sent, nxt = hashlib.sha256(), 0, time.time()
while not stop.is_set():
    b = array.array("I", range(sent, sent + 65536, 4)).tobytes()
    s.sendall(b)
    h.update(b)
    sent += len(b)
    nxt += 0.01
    wait = nxt - time.time()
    if wait > 0:
        time.sleep(wait)
s.shutdown(socket.SHUT_WR)
print(sent, h.hexdigest(), flush=True)
"""


class Fail(Exception):
    pass


class Guest:
    """One QEMU process: its serial console on stdin/stdout, its QMP socket."""

    def __init__(self, args, log_path, qmp_path):
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.buf = b""
        self.lock = threading.Lock()
        self.qmp_path = qmp_path
        self.qmp = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.next_marker = random.randrange(1 << 30)

    def _read(self):
        while True:
            data = self.proc.stdout.read1(65536)
            if not data:
                return
            self.log.write(data)
            self.log.flush()
            with self.lock:
                self.buf += data

    def text(self):
        with self.lock:
            return self.buf.decode("utf-8", "replace")

    def wait_text(self, pattern, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                raise Fail(f"QEMU exited ({self.proc.returncode}) waiting for {pattern!r}")
            time.sleep(0.05)
        raise Fail(f"no {pattern!r} on the console within {timeout} s")

    def run(self, command, timeout=60):
        self.next_marker += 1
        marker = f"MK{self.next_marker}"
        start = len(self.text())
        self.proc.stdin.write(f"{command}\necho {marker}=$?\n".encode())
        self.proc.stdin.flush()
        m = self.wait_text(rf"{marker}=(\d+)", timeout)
        return self.text()[start : m.start()]

    def connect_qmp(self, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.qmp_path)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise Fail("QMP socket does not answer")
                time.sleep(0.1)
        s.settimeout(30)
        self.qmp = s.makefile("rwb")
        self.qmp.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.qmp.write(json.dumps(msg).encode() + b"\n")
        self.qmp.flush()
        while True:
            line = self.qmp.readline()
            if not line:
                raise Fail(f"QMP closed during {cmd}")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise Fail(f"QMP {cmd}: {reply['error']}")
            # events: ignored

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()  # our child, by PID
        self.proc.wait()
        self.log.close()


def qemu_args(variant, guest_dir, work, tag, incoming=None, netns=None):
    mib = 128
    append = "console=ttyS0 panic=-1 ipv6.disable_ipv6=1 no_timer_check"
    args = ["ip", "netns", "exec", netns] if netns else []
    args += ["qemu-system-x86_64", "-name", f"vmq-migctl-{tag}", "-accel", "tcg", "-smp", "1", "-m", f"{mib}M"]
    if variant == "nonet-anon":
        args += ["-machine", "q35"]
    else:
        args += ["-object", f"memory-backend-memfd,id=mem,size={mib}M,share=on", "-machine", "q35,memory-backend=mem"]
    args += ["-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none"]
    side = "A" if tag.endswith("a") or tag == "boot" else "B"
    device = "virtio-net-pci,netdev=net0,mac=52:54:00:75:00:01,vectors=0"
    if variant == "vmq":
        sock = os.path.join(work, f"vmq{side}", "vm1.sock")
        args += ["-chardev", f"socket,id=vhu0,path={sock}", "-netdev", "vhost-user,id=net0,chardev=vhu0",
                 "-device", device]
        append += " vmq.ip=10.75.0.1/24"
    elif variant == "tap":
        # QEMU's own virtio-net (vhost=off): QEMU writes the RX buffers and marks them itself.
        args += ["-netdev", f"tap,id=net0,ifname=tap{side},script=no,downscript=no,vhost=off", "-device", device]
        append += " vmq.ip=10.75.0.1/24"
    else:
        args += ["-nic", "none"]
    args += ["-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0", "-append", append]
    args += ["-qmp", f"unix:{os.path.join(work, 'qmp-' + tag + '.sock')},server=on,wait=off"]
    if incoming:
        args += ["-incoming", incoming]
    args += ["-kernel", os.path.join(guest_dir, "vmlinuz"), "-initrd", os.path.join(guest_dir, "initramfs.cpio.gz")]
    return args


def start_guest(variant, guest_dir, work, tag, incoming=None, net=None):
    qmp = os.path.join(work, f"qmp-{tag}.sock")
    if os.path.exists(qmp):
        os.unlink(qmp)
    # The tap variant's QEMU runs in the bridge namespace: its TAP device is created there.
    netns = net.net if net and variant == "tap" else None
    guest = Guest(qemu_args(variant, guest_dir, work, tag, incoming, netns), os.path.join(work, f"console-{tag}.log"), qmp)
    if netns:
        tap = "tapA" if tag.endswith("a") or tag == "boot" else "tapB"
        deadline = time.time() + 30
        while subprocess.run(["ip", "-n", netns, "link", "set", tap, "master", "br0", "up"],
                             stderr=subprocess.DEVNULL).returncode != 0:
            if time.time() > deadline or guest.proc.poll() is not None:
                raise Fail(f"{tap} did not appear")
            time.sleep(0.1)
    return guest


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)


class Network:
    """The migration test's topology: a bridge namespace with both uplinks and an external host."""

    def __init__(self, vmq_bin, work, with_vmq):
        self.net, self.ext = f"vqmcn{os.getpid() % 100000}", f"vqmcx{os.getpid() % 100000}"
        self.procs = []
        sh("ip", "netns", "add", self.net)
        sh("ip", "netns", "add", self.ext)
        for ns in (self.net, self.ext):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        n = ["ip", "-n", self.net]
        sh(*n, "link", "add", "br0", "type", "bridge")
        sh(*n, "link", "set", "br0", "up")
        for up, port in (("upA", "pa"), ("upB", "pb")):
            sh(*n, "link", "add", up, "type", "veth", "peer", "name", port)
            sh(*n, "link", "set", port, "master", "br0", "up")
            sh(*n, "link", "set", up, "up")
        sh(*n, "link", "add", "pe", "type", "veth", "peer", "name", "eth0", "netns", self.ext)
        sh(*n, "link", "set", "pe", "master", "br0", "up")
        sh("ip", "-n", self.ext, "addr", "add", "10.75.0.200/24", "dev", "eth0")
        sh("ip", "-n", self.ext, "link", "set", "eth0", "up")
        for side in ("A", "B") if with_vmq else ():
            d = os.path.join(work, f"vmq{side}")
            os.makedirs(d, exist_ok=True)
            cfg = (
                f'[switch]\nmode = "vmq"\nworkers = 1\n\n[control]\nsocket = "{d}/control.sock"\nmetrics = "off"\n\n'
                f'[[port]]\nname = "vm1"\nkind = "vhost-user"\nsocket = "{d}/vm1.sock"\nmac = "52:54:00:75:00:01"\n'
                f'mtu = 1500\nvlan = 0\noffloads = true\n\n'
                f'[[port]]\nname = "up0"\nkind = "uplink"\nifname = "up{side}"\nnetns = "{self.net}"\nmtu = 1500\n'
            )
            with open(f"{d}/vmq.toml", "w") as f:
                f.write(cfg)
            log = open(f"{d}/vmq.log", "wb")
            self.procs.append(subprocess.Popen([vmq_bin, "run", "--config", f"{d}/vmq.toml"], stdout=log,
                                               stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info", NO_COLOR="1")))
            deadline = time.time() + 30
            while not os.path.exists(f"{d}/vm1.sock"):
                if time.time() > deadline or self.procs[-1].poll() is not None:
                    raise Fail(f"vmq {side} did not start (see {d}/vmq.log)")
                time.sleep(0.1)

    def start_ping(self, work):
        log = open(os.path.join(work, "ping.log"), "wb")
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.ext, "ping", "-D", "-q", "-i", "0.005",
                                            "-s", "1400", "10.75.0.1"], stdout=log, stderr=subprocess.STDOUT))

    def start_stream(self):
        """The migration test's stream: every 4-byte word holds its offset, 64 KiB every 10 ms,
        from the external host to the guest's port 5001 until stdin closes; prints the bytes
        sent and their SHA-256."""
        sender = subprocess.Popen(["ip", "netns", "exec", self.ext, sys.executable, "-c", SENDER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(sender)
        return sender

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p.args[0] == "ip" else signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in (self.net, self.ext):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def check(vm, last_iter, timeout):
    out = vm.run(f"cat /tmp/iter; cat /tmp/bad 2>/dev/null; dmesg | grep -E '{COMPLAINTS}' | head -5", timeout)
    lines = [l for l in out.replace("\r", "").split("\n") if l.strip()]
    nums = [l for l in lines if l.strip().isdigit()]
    it = int(nums[0]) if nums else -1
    problems = [l for l in lines if l.startswith("round ") or re.search(COMPLAINTS, l)]
    return it, problems


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["nonet-memfd", "nonet-anon", "vmq", "tap"], required=True)
    p.add_argument("--moves", type=int, default=25)
    p.add_argument("--guest", default="target/guest")
    p.add_argument("--vmq", default="target/debug/vmq")
    p.add_argument("--workdir", default=None)
    p.add_argument("--ref-mib", type=int, default=16, help="size of the reference file (the copy is as large)")
    p.add_argument("--no-cp", action="store_true", help="no copy-and-hash workload (only a counter)")
    p.add_argument("--keep", action="store_true", help="with --stream: the guest also keeps a copy in tmpfs (as the test does), replaced each move")
    p.add_argument("--stream", action="store_true", help="vmq and tap: a TCP stream into the guest across each move, its SHA-256 checked")
    p.add_argument("--pause", type=float, nargs=2, default=[2.0, 5.0], help="seconds between moves (random in range)")
    o = p.parse_args()
    work = os.path.abspath(o.workdir or f"/tmp/migctl-{o.variant}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    guest_dir = os.path.abspath(o.guest)
    net = None
    guests = []
    moves_ok = 0
    failure = "none"
    try:
        if o.variant in ("vmq", "tap"):
            net = Network(os.path.abspath(o.vmq), work, o.variant == "vmq")
        vm = start_guest(o.variant, guest_dir, work, "boot", net=net)
        guests.append(vm)
        vm.wait_text(r"VMQ-GUEST-READY", 240)
        vm.connect_qmp()
        # Kernel messages back on the console: an oops shows there even if the shell dies.
        vm.run("echo 8 > /proc/sys/kernel/printk")
        if o.no_cp:
            vm.run("echo 0 > /tmp/iter; (i=0; while :; do i=$((i+1)); sleep 0.2; echo $i > /tmp/iter; done) >/dev/null 2>&1 &")
        else:
            vm.run(WORKLOAD.replace("{mib}", str(o.ref_mib)))
        if net:
            vm.run("for i in $(seq 100); do ip link show eth0 | grep -q LOWER_UP && break; sleep 0.1; done", 30)
            net.start_ping(work)
        time.sleep(3)
        last, problems = check(vm, 0, 60)
        print(f"start: workload at round {last} {problems}", flush=True)
        for n in range(1, o.moves + 1):
            tag = f"m{n}" + ("b" if n % 2 else "a")
            incoming = os.path.join(work, f"in-{tag}.sock")
            sender = None
            if o.stream and net:
                keep = "tee /tmp/s.bin | " if o.keep else ""
                vm.run(f"rm -f /tmp/s.sum /tmp/s.bin; sh -c 'nc -l -p 5001 | {keep}sha256sum > /tmp/s.sum' </dev/null >/tmp/s.log 2>&1 &")
                vm.run("for i in $(seq 100); do netstat -ltn | grep -q ':5001 ' && break; sleep 0.1; done", 30)
                sender = net.start_stream()
                time.sleep(1)
                if sender.poll() is not None:
                    raise Fail(f"move {n}: the stream did not start: {sender.stdout.read()!r}")
            dest = start_guest(o.variant, guest_dir, work, tag, f"unix:{incoming}", net=net)
            guests.append(dest)
            dest.connect_qmp()
            vm.execute("migrate-set-parameters", {"max-bandwidth": 4 << 30, "downtime-limit": 300})
            t0 = time.time()
            vm.execute("migrate", {"uri": f"unix:{incoming}"})
            deadline = t0 + 120
            while True:
                info = vm.execute("query-migrate")
                st = info.get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled") or time.time() > deadline:
                    raise Fail(f"move {n}: migration {st}: {info}")
                time.sleep(0.1)
            deadline = time.time() + 30
            while dest.execute("query-status").get("status") != "running":
                if time.time() > deadline:
                    raise Fail(f"move {n}: destination not running")
                time.sleep(0.1)
            vm.stop()
            guests.remove(vm)
            dest.next_marker = vm.next_marker + 1000
            vm = dest
            # Let the workload run on the destination, then look.
            time.sleep(random.uniform(*o.pause))
            # A round takes seconds on a loaded host: a workload that does not advance within
            # 60 s has stopped.
            give_up = time.time() + 60
            while True:
                try:
                    it, problems = check(vm, last, 60)
                except Fail as e:
                    raise Fail(f"move {n}: guest does not answer after the move: {e}")
                advanced = it > last
                if advanced or problems or time.time() > give_up:
                    break
                time.sleep(1)
            print(f"move {n} ({tag}): {time.time() - t0:.1f} s, downtime {info.get('downtime')} ms, "
                  f"round {last} -> {it}{'' if advanced else ' (NOT ADVANCING)'} {problems if problems else ''}", flush=True)
            if problems or not advanced:
                raise Fail(f"move {n}: {problems if problems else 'workload stopped'}")
            if sender:
                try:
                    out, _ = sender.communicate(b"", timeout=90)
                except subprocess.TimeoutExpired:
                    sender.kill()
                    sender.wait()
                    raise Fail(f"move {n}: the stream sender hung")
                fields = out.decode().split()
                if sender.returncode != 0 or len(fields) != 2:
                    raise Fail(f"move {n}: the stream broke: {out.decode()[-500:]!r}")
                got = vm.run("for i in $(seq 900); do [ -s /tmp/s.sum ] && break; sleep 0.1; done; cat /tmp/s.sum", 120)
                ok = fields[1] in got
                print(f"  stream {fields[0]} bytes: {'intact' if ok else 'CORRUPTED'}", flush=True)
                if not ok:
                    more = vm.run("ls -l /tmp/s.sum; cat /tmp/s.log; ps; netstat -tn", 30)
                    raise Fail(f"move {n}: stream of {fields[0]} bytes arrived with another SHA-256: {got.strip()[-100:]!r}; {more!r}")
            last = it
            moves_ok += 1
    except Fail as e:
        failure = str(e).replace("\n", " ")[:300]
        tail = guests[-1].text()[-3000:] if guests else ""
        print(f"FAIL: {e}\n--- console tail ---\n{tail}", flush=True)
    finally:
        for g in guests:
            g.stop()
        if net:
            net.stop()
    print(f"RESULT variant={o.variant} moves_ok={moves_ok}/{o.moves} failure={failure} logs={work}", flush=True)
    return 0 if failure == "none" else 1


if __name__ == "__main__":
    sys.exit(main())
