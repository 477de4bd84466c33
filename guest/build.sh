#!/usr/bin/env bash
# guest/build.sh OUTDIR — builds vmfabric's test guest from Debian packages:
#   OUTDIR/vmlinuz            Debian's cloud kernel (virtio drivers as modules)
#   OUTDIR/initramfs.cpio.gz  busybox-static, the virtio-net modules and our /init
# The .debs are cached in OUTDIR/debs and the result is reused while this script is
# unchanged (FORCE=1 rebuilds). Needs apt-get, dpkg-deb, cpio-capable busybox, gzip.
#
# The guest is configured from the kernel command line. The kernel hands every
# NAME=value without a dot to /init as an environment variable:
#   VMF_IP=dhcp|A.B.C.D/NN|none   network config (default dhcp, via udhcpc)
#   VMF_GW=A.B.C.D VMF_DNS=A.B.C.D  with a static address
#   VMF_HOSTNAME=name              sent as the DHCP hostname too
#   VMF_NICS=N                     wait for N NICs (each leases; default 1)
#   VMF_READY_MAC=mac              the NIC the readiness marker names (default: first)
#   VMF_NONCE=token                echoed in the readiness marker (per boot)
#   VMF_HTTP=1                     serve /www on TCP 80 (busybox httpd)
#   VMF_CMD=<base64 sh script>     run after the network is ready
#   VMF_END=poweroff|hang          after the command (default: poweroff)
# Console markers, one per line:
#   VMFABRIC_BOOTED  VMFABRIC_READY <nonce> <ip> <mac>  VMFABRIC_NET_FAIL <why>
#   VMFABRIC_CMD_EXIT <rc>  VMFABRIC_END
set -euo pipefail

OUT=${1:?usage: guest/build.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF_HASH=$(sha256sum "$0" | cut -c1-16)
say() { echo "[guest] $*" >&2; }

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] \
    && [ "$(cat "$OUT/.built-by" 2>/dev/null)" = "$SELF_HASH" ]; then
    say "cached: $OUT (FORCE=1 to rebuild)"
    exit 0
fi

DEBS=$OUT/debs
mkdir -p "$DEBS"
# The metapackage names today's kernel; resolve it to the versioned package.
if ! KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}') || [ -z "$KPKG" ]; then
    say "refreshing the package lists (apt-get update)"
    apt-get update -qq
    KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$KPKG" ] || { say "cannot resolve linux-image-cloud-amd64"; exit 1; }

download() {
    local pkg=$1
    if ! ls "$DEBS/${pkg}"_*.deb >/dev/null 2>&1 || [ "${FORCE:-0}" = 1 ]; then
        rm -f "$DEBS/${pkg}"_*.deb
        say "downloading $pkg"
        # apt-get download shows its own progress; it writes to the current directory.
        (cd "$DEBS" && apt-get download "$pkg" >&2)
    fi
    ls "$DEBS/${pkg}"_*.deb | head -n1
}
KDEB=$(download "$KPKG")
BDEB=$(download busybox-static)

WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$WORK/kernel" "$WORK/busybox"
say "unpacking $(basename "$KDEB") and $(basename "$BDEB")"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BDEB" "$WORK/busybox"
KVER=$(ls "$WORK/kernel/lib/modules" | head -n1)
BB=$WORK/busybox/bin/busybox

ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,www,lib/modules}
cp "$BB" "$ROOT/bin/busybox"
for applet in $("$BB" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done

# virtio-net over PCI (q35) and MMIO (microvm). The package ships no modules.dep, so
# the load order is fixed here, dependencies first; a module missing as a file is
# built into this kernel.
# Beside the NIC: virtio-blk with FAT (data disks, the cloud-init seed) and vsock.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio failover net_failover virtio_net
virtio_blk fat vfat nls_cp437 nls_ascii nls_utf8 vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
: > "$ROOT/lib/modules/order"
for m in $MODULES; do
    f=$(find "$WORK/kernel/lib/modules/$KVER" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || continue
    case $f in
        *.ko.xz) "$BB" unxz -c "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
        *) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$ROOT/lib/modules/order"
done

cat > "$ROOT/etc/dhcp-hook" <<'EOF'
#!/bin/sh
# udhcpc calls this with the lease in its environment. It flushes IPv4 only: the
# kernel's IPv6 addresses (link-local, SLAAC) stay.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    # With several NICs the first to lease (the readiness NIC) keeps the default
    # route and the resolver.
    # (busybox's "ip route show default" lists every route: ask for 0/0 exactly.)
    if [ -n "$router" ] && [ -z "$(ip route list exact 0/0)" ]; then
        ip route add default via "${router%% *}" dev "$interface"
    fi
    if [ ! -s /etc/resolv.conf ]; then
        for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf; done
        [ -n "$search" ] && echo "search $search" >> /etc/resolv.conf
        [ -z "$search" ] && [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    fi
    echo "$ip" > "/run/ip.$interface"
    # /run/ip: the readiness NIC's address (what commands and renewals read).
    [ "$interface" = "${VMF_READY_NIC:-$interface}" ] && echo "$ip" > /run/ip ;;
esac
exit 0
EOF
chmod 755 "$ROOT/etc/dhcp-hook"

cat > "$ROOT/init" <<'EOF'
#!/bin/sh
# vmfabric test guest: bring up the NIC, say so on the console, run the command.
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs run /run; mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1
echo VMFABRIC_BOOTED
dmesg -n 1
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /lib/modules/order
hostname "${VMF_HOSTNAME:-guest}"
ip link set lo up

# NICs appear one by one: wait for as many as the runner attached (VMF_NICS).
nics=
for _ in $(seq 50); do
    nics=$(ls /sys/class/net | grep -vx lo)
    [ "$(echo "$nics" | grep -c .)" -ge "${VMF_NICS:-1}" ] && break
    sleep 0.1
done
# The readiness NIC (VMF_READY_MAC, else the first) leases first; the others after.
nic=$(echo "$nics" | head -n1)
for n in $nics; do
    [ "$(cat "/sys/class/net/$n/address")" = "$VMF_READY_MAC" ] && nic=$n
done
export VMF_READY_NIC=$nic
# udhcpc -n gives up after three unanswered REQUESTs (3 s with -T 1); a real client
# starts over with a DISCOVER, and so does this one, twice, so a slow host costs time,
# not the lease.
lease() {
    for _ in 1 2 3; do
        udhcpc -i "$1" -s /etc/dhcp-hook -x "hostname:${VMF_HOSTNAME:-guest}" -O search -O mtu \
            -t "${VMF_DHCP_TRIES:-10}" -T 1 -A 1 -n -q -f && return 0
    done
    return 1
}

ip=
if [ -z "$nic" ]; then
    echo "VMFABRIC_NET_FAIL no-nic"
else
    for n in $nics; do ip link set "$n" up; done
    case "${VMF_IP:-dhcp}" in
    dhcp)
        if lease "$nic"; then
            ip=$(cat /run/ip)
        else
            echo "VMFABRIC_NET_FAIL dhcp"
        fi
        for n in $nics; do
            [ "$n" = "$nic" ] || lease "$n" || echo "VMFABRIC_NET_FAIL dhcp $n"
        done ;;
    none) ;;
    *)
        ip addr add "$VMF_IP" dev "$nic"
        ip=${VMF_IP%/*}
        [ -n "$VMF_GW" ] && ip route add default via "$VMF_GW"
        [ -n "$VMF_DNS" ] && echo "nameserver $VMF_DNS" > /etc/resolv.conf ;;
    esac
fi
# Served before the marker: a guest said ready answers at once (a test that fetched
# right after a restart's marker found nothing listening yet).
[ "${VMF_HTTP:-0}" = 1 ] && httpd -p 80 -h /www
[ -n "$ip" ] && echo "VMFABRIC_READY ${VMF_NONCE:--} $ip $(cat "/sys/class/net/$nic/address")"

if [ -n "$VMF_CMD" ]; then
    echo "$VMF_CMD" | base64 -d > /tmp/cmd
    sh /tmp/cmd
    echo "VMFABRIC_CMD_EXIT $?"
fi
echo VMFABRIC_END
case "${VMF_END:-poweroff}" in
hang) while :; do sleep 3600; done ;;
*) sync; poweroff -f ;;
esac
EOF
chmod 755 "$ROOT/init"
echo "hello from $(echo vmfabric) guest" > "$ROOT/www/index.html"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"

say "packing initramfs"
(cd "$ROOT" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/kernel-version"
rm -rf "$WORK"
echo "$SELF_HASH" > "$OUT/.built-by"
say "ready: $OUT (kernel $KVER, initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
