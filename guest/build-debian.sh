#!/usr/bin/env bash
# guest/build-debian.sh OUTDIR — a realistic guest beside the test guest: Debian 12
# with systemd, cloud-init and an SSH server, from Debian's packages (mmdebstrap), in an
# ext4 image made without loop mounts (mkfs.ext4 -d):
#   OUTDIR/disk.raw     the root filesystem (sparse, 2 GiB; boot it as an overlay)
#   OUTDIR/vmlinuz      its kernel (Debian's generic kernel: virtio, 9p, vsock)
#   OUTDIR/initrd.img   its initramfs (mounts /dev/vda)
# Reused while this script is unchanged (FORCE=1 rebuilds).
#
# Boot it with: vm run --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.img
#   --root-disk OUTDIR/disk.raw --cloud-init user-data.yaml
# cloud-init takes the hostname and SSH keys from the seed; the network comes up by
# DHCP on every NIC (systemd-networkd). Once the first NIC has its address, a unit
# prints `VMFABRIC_READY <nonce> <ip> <mac>` on the serial console (the nonce from the
# kernel command line's VMF_NONCE), as the test guest does.
set -euo pipefail

OUT=${1:?usage: guest/build-debian.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SELF_HASH=$(sha256sum "$0" | cut -c1-16)
say() { echo "[debian-guest] $*" >&2; }

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/disk.raw" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] \
    && [ "$(cat "$OUT/.built-by" 2>/dev/null)" = "$SELF_HASH" ]; then
    say "cached: $OUT (FORCE=1 to rebuild)"
    exit 0
fi
command -v mmdebstrap >/dev/null || { say "needs mmdebstrap (apt-get install mmdebstrap)"; exit 1; }

ROOT=$OUT/root
rm -rf "$ROOT" "$OUT/disk.raw"
mkdir -p "$ROOT"

# What the guest needs to boot, be configured and be reached; nothing recommended.
PACKAGES=systemd-sysv,udev,linux-image-amd64,initramfs-tools,cloud-init,openssh-server,iproute2,iputils-ping,netbase,ca-certificates
say "installing Debian 12 into $ROOT (mmdebstrap)"
mmdebstrap --variant=minbase --include="$PACKAGES" --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd' \
    bookworm "$ROOT" >&2

# Every NIC by DHCP, sending the hostname (vmfabric names VMs in DNS by it).
cat > "$ROOT/etc/systemd/network/50-dhcp.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=ipv4

[DHCPv4]
SendHostname=yes
EOF
# cloud-init: NoCloud only (no probing for clouds), and it leaves the network to
# networkd above.
cat > "$ROOT/etc/cloud/cloud.cfg.d/90-vmfabric.cfg" <<'EOF'
datasource_list: [NoCloud, None]
network: {config: disabled}
EOF
echo "/dev/vda / ext4 defaults 0 1" > "$ROOT/etc/fstab"
: > "$ROOT/etc/machine-id"
rm -f "$ROOT"/etc/ssh/ssh_host_*

cat > "$ROOT/usr/local/sbin/vmfabric-ready" <<'EOF'
#!/bin/sh
# Prints vmfabric's readiness marker on the serial console once the NIC named by
# VMF_READY_MAC (else the first) has an IPv4 address.
nonce=-; want=
for w in $(cat /proc/cmdline); do
    case $w in
    VMF_NONCE=*) nonce=${w#VMF_NONCE=} ;;
    VMF_READY_MAC=*) want=${w#VMF_READY_MAC=} ;;
    esac
done
while :; do
    for d in /sys/class/net/*; do
        nic=${d##*/}
        [ "$nic" = lo ] && continue
        mac=$(cat "$d/address")
        [ -n "$want" ] && [ "$mac" != "$want" ] && continue
        ip=$(ip -4 -o addr show dev "$nic" scope global | awk '{print $4}' | cut -d/ -f1 | head -n1)
        if [ -n "$ip" ]; then
            echo "VMFABRIC_READY $nonce $ip $mac" > /dev/ttyS0
            exit 0
        fi
        [ -z "$want" ] && break
    done
    sleep 0.5
done
EOF
chmod 755 "$ROOT/usr/local/sbin/vmfabric-ready"
cat > "$ROOT/etc/systemd/system/vmfabric-ready.service" <<'EOF'
[Unit]
Description=Tell vmfabric the guest is ready
After=network.target cloud-init.service ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmfabric-ready

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vmfabric-ready.service "$ROOT/etc/systemd/system/multi-user.target.wants/vmfabric-ready.service"
# Timers and jobs that only cost a short-lived VM boot time.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
        systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done

KVER=$(ls "$ROOT/lib/modules" | head -n1)
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$OUT/initrd.img"
rm -rf "$ROOT/var/cache/apt/archives"/*.deb "$ROOT/var/lib/apt/lists"/*_Packages
say "making the ext4 image (mkfs.ext4 -d, no loop device)"
mkfs.ext4 -q -F -L vmfroot -d "$ROOT" "$OUT/disk.raw" 2G
chmod 644 "$OUT/vmlinuz" "$OUT/initrd.img"
rm -rf "$ROOT"
echo "$KVER" > "$OUT/kernel-version"
echo "$SELF_HASH" > "$OUT/.built-by"
say "ready: $OUT (kernel $KVER, $(du -h "$OUT/disk.raw" | cut -f1) used of 2G)"
