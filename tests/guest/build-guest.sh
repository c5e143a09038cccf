#!/usr/bin/env bash
# Builds a small Linux guest for the end-to-end tests from Debian packages: a cloud kernel
# (unpacked with dpkg -x, never installed on the host) and an initramfs with busybox, the
# virtio-net modules, iperf3 and ethtool. The guest's shell runs on its serial console; the
# tests drive it there (crates/testkit, module qemu). Output (cached): OUT/vmlinuz,
# OUT/initramfs.cpio.gz and OUT/guest-format.
#
# Serial console protocol (guest-format 2), which crates/testkit relies on:
# - boot messages, then one line "VMQ-GUEST-READY format=2 mtu=<eth0 mtu>";
# - the console is then in raw mode without echo, kernel messages are off (dmesg has them),
#   and a non-interactive shell reads commands from it: no prompt, no line editing, no echo.
set -euo pipefail
format=2
out=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$out/initramfs.cpio.gz" -nt "$0" ] \
    && [ "$(cat "$out/guest-format" 2>/dev/null)" = "$format" ]; then
    exit 0
fi
for tool in busybox iperf3 ethtool cpio; do
    command -v "$tool" >/dev/null || { echo "build-guest: $tool is missing (apt-get install busybox-static iperf3 ethtool cpio)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The newest cloud kernel the archive offers (the meta-package depends on it).
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "build-guest: no linux-image-*-cloud-amd64 in the apt lists (apt-get update?)" >&2; exit 1; }
(cd "$work" && apt-get download -q "$pkg" >/dev/null)
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")

root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules,usr/bin,root}
cp "$(command -v busybox)" "$root/bin/busybox"
# Every applet (stty, timeout, dmesg, sed, tr, ... are all used by tests).
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
mods="$work/kernel/lib/modules/$kver/kernel"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev \
         drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci net/core/failover \
         drivers/net/net_failover drivers/net/virtio_net; do
    f=$(ls "$mods/$m".ko* 2>/dev/null | head -1) || true
    [ -n "$f" ] || continue   # built into this kernel
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$(basename "$m").ko" ;;
        *.zst) zstd -qdc "$f" > "$root/lib/modules/$(basename "$m").ko" ;;
        *) cp "$f" "$root/lib/modules/$(basename "$m").ko" ;;
    esac
    echo "$(basename "$m")" >> "$root/lib/modules/order"
done
# Dynamically linked tools with the libraries they load.
for bin in "$(command -v iperf3)" "$(command -v ethtool)"; do
    cp "$bin" "$root/usr/bin/"
    # Libraries, and the dynamic loader (the line without "=>"; mawk has no \s).
    for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done

cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read m; do insmod /lib/modules/$m.ko 2>/dev/null; done < /lib/modules/order
# Kernel command line: vmq.ip=ADDR/PREFIX [vmq.mtu=N]
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmq.ip=*) ip_addr=${arg#vmq.ip=} ;;
        vmq.mtu=*) mtu=${arg#vmq.mtu=} ;;
    esac
done
ip link set lo up
if [ -n "$ip_addr" ]; then
    [ -n "$mtu" ] && ip link set eth0 mtu "$mtu"
    ip addr add "$ip_addr" dev eth0
    ip link set eth0 up
fi
# The test harness talks to a plain shell: no echo, no CR/LF translation, no line editing
# (a shell reading a pipe is non-interactive), and no kernel messages in command output.
stty -F /dev/ttyS0 raw -echo
echo 1 > /proc/sys/kernel/printk
echo "VMQ-GUEST-READY format=2 mtu=$(cat /sys/class/net/eth0/mtu 2>/dev/null)"
# The shell reads a pipe fed byte by byte by dd: busybox cat would use sendfile(), which holds
# input back until more arrives. PID 1 must not exit: if the shell ever does, start another.
exec setsid sh -c 'while :; do dd if=/dev/ttyS0 bs=1 2>/dev/null | sh >/dev/ttyS0 2>&1; done'
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initramfs.cpio.gz.tmp")
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$format" > "$out/guest-format"
echo "build-guest: kernel $kver, initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1)"
