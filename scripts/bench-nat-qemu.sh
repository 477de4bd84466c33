#!/usr/bin/env bash
# scripts/bench-nat-qemu.sh — NAT TCP from a real QEMU guest: vmfabric over a vhost-user
# port beside QEMU's own user networking (libslirp, what slirp4netns wraps), one run,
# interleaved. Needs root and the test guest (built if missing). (passt is not here:
# Debian 12's 2023 build, on QEMU's stream netdev, leases the guest an address but its
# TCP connections to the host stay in SYN_SENT by its own log; pasta, the same program
# for namespaces, is in bench-nat.sh.)
#
# Each guest (microvm, one vCPU, virtio-net-device on the backend) downloads MIB MiB from
# a server on the host's loopback and uploads UP_MIB MiB to a sink there, through each
# backend's address for the host: vmfabric's host-access address, 10.0.2.2 under slirp.
# Download time is the guest's (/proc/uptime around nc), upload time the sink's (first
# byte to end). CPU: the relay's
# core-seconds over the whole guest run, boot included, per GB moved (vmfabric: the
# daemon; slirp: QEMU's main thread, where libslirp runs), and the guest's vCPU thread's %
# over the run: near 100 % the guest is the bound, not the relay.
#
# Under TCG (this machine's /dev/kvm is PVM, which stock guest kernels do not run under)
# the emulated guest caps every backend. MTUS: 1500 for both; 65520 for vmfabric only
# (QEMU's user netdev has no MTU option).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
MIB=${MIB:-100}
# Uploads are smaller: busybox nc in the emulated guest sends about 10 Mbit/s whatever the
# backend (measured), so 100 MiB would take minutes per run.
UP_MIB=${UP_MIB:-10}
MTUS=${MTUS:-1500 65520}
bench_start qemu-system-x86 python3
GUEST=${VMFABRIC_GUEST_DIR:-$PWD/target/guest}
[ -f "$GUEST/vmlinuz" ] || guest/build.sh "$GUEST" >&2
export VMFABRIC_SOCKET=$WORK/api.sock
# Under TCG the guest's own TSC calibration can fail on a busy host and hang its kernel
# (as the VM runner knows): it is given the host's rate.
TSC="tsc_early_khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)"
DOWN_PORT=5411
UP_PORT=5412
cleanup() {
    set +e
    [ -n "${QEMU:-}" ] && kill "$QEMU" 2>/dev/null
    [ -n "${SERVERS:-}" ] && kill "$SERVERS" 2>/dev/null
    [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

start_daemon
# The host's ends: a source that sends MIB MiB to each connection, and a sink that prints
# the bytes and seconds (first byte to end) of each.
python3 -u -c '
import socket, sys, threading, time
size, down, up = int(sys.argv[1]) << 20, int(sys.argv[2]), int(sys.argv[3])
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(8); return s
def source(s):
    chunk = memoryview(bytes(1 << 20))
    while True:
        c, _ = s.accept(); left = size
        while left:
            left -= c.send(chunk[:min(left, len(chunk))])
        c.close()
threading.Thread(target=source, args=(listener(down),), daemon=True).start()
sink = listener(up)
while True:
    c, _ = sink.accept(); got, t0 = 0, None
    while True:
        d = c.recv(1 << 20)
        if not d: break
        t0 = t0 or time.monotonic(); got += len(d)
    print(got, time.monotonic() - t0)
    c.close()
' "$MIB" "$DOWN_PORT" "$UP_PORT" >"$WORK/sink.log" &
SERVERS=$!
sleep 0.5

# Boots the guest on the NIC arguments given, waits for both transfers; prints
# "down_gbps up_gbps relay_cpu_s_per_gb vcpu_pct". $1: the host's address from the
# guest; $2: the relay's pid, or "qemu": QEMU's own main thread (where libslirp runs).
guest_run() {
    local host=$1 relay=$2 thread=
    shift 2
    local cmd serial="$WORK/serial.log" sinks c0 c1 t0 t1 vcpu v1 line up_secs
    cmd="a=\$(cut -d' ' -f1 /proc/uptime); nc $host $DOWN_PORT </dev/null >/dev/null; b=\$(cut -d' ' -f1 /proc/uptime); echo \"BENCH_DOWN \$a \$b\"; dd if=/dev/zero bs=64k count=$((UP_MIB * 16)) 2>/dev/null | nc $host $UP_PORT; echo BENCH_UP"
    : >"$serial"
    sinks=$(wc -l <"$WORK/sink.log")
    relay_ticks() { if [ -n "$thread" ]; then awk '{print $14 + $15}' "/proc/$relay/task/$thread/stat"; else cpu_ticks "$relay"; fi; }
    c0=0
    [ "$relay" = qemu ] || c0=$(relay_ticks)
    t0=$(date +%s.%N)
    qemu-system-x86_64 -name bench,debug-threads=on -nodefaults -no-user-config -display none -no-reboot \
        -accel tcg,thread=single,tb-size=64 -cpu max -M microvm,x-option-roms=off,acpi=on \
        -smp 1 -m 512 -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 reboot=t $TSC VMF_HOSTNAME=bench VMF_IP=dhcp VMF_END=hang VMF_CMD=$(printf '%s' "$cmd" | base64 -w0)" \
        -serial "file:$serial" "$@" &
    QEMU=$!
    [ "$relay" = qemu ] && relay=$QEMU thread=$QEMU
    for _ in $(seq 600); do
        grep -q 'BENCH_UP\|VMFABRIC_END\|VMFABRIC_NET_FAIL' "$serial" 2>/dev/null && break
        sleep 0.5
    done
    # The vCPU thread (named "CPU 0/TCG" or "ALL CPUs/TCG" with debug-threads=on).
    vcpu=$(grep -l 'TCG' /proc/"$QEMU"/task/*/comm 2>/dev/null | head -1 | xargs dirname 2>/dev/null || true)
    # (Its name has a space: the fields are counted after the name's closing bracket.)
    v1=$([ -n "$vcpu" ] && sed 's/.*) //' "$vcpu/stat" | awk '{print $12 + $13}' || echo 0)
    c1=$(relay_ticks)
    t1=$(date +%s.%N)
    kill "$QEMU" 2>/dev/null || true
    wait "$QEMU" 2>/dev/null || true
    QEMU=
    grep -q BENCH_UP "$serial" || { cat "$serial" >&2; echo "the guest did not finish" >&2; exit 1; }
    for _ in $(seq 20); do [ "$(wc -l <"$WORK/sink.log")" -gt "$sinks" ] && break; sleep 0.2; done
    line=$(grep BENCH_DOWN "$serial" | tr -d '\r')
    up_secs=$(tail -n1 "$WORK/sink.log" | awk '{print $2}')
    python3 -c "
import sys
mib, up_mib, a, b, up, ticks, hz, wall, vcpu = sys.argv[1:]
down_gb, up_gb = int(mib) * 2**20 / 1e9, int(up_mib) * 2**20 / 1e9
down = down_gb * 8 / (float(b) - float(a)); upg = up_gb * 8 / float(up)
print('%.3f %.3f %.1f %.0f' % (down, upg, float(ticks) / float(hz) / (down_gb + up_gb), 100 * float(vcpu) / float(hz) / float(wall)))
" "$MIB" "$UP_MIB" $(echo "$line" | awk '{print $2, $3}') "$up_secs" "$((c1 - c0))" "$HZ" "$(python3 -c "print($t1 - $t0)")" "$v1"
}

vhost_user_args() { # mtu: sets NIC_ARGS for a fresh vhost-user port on network qbench
    "$BIN" network rm qbench --force >/dev/null 2>&1 || true
    "$BIN" network create qbench --subnet 10.241.0.0/24 --mtu "$1" --host-access --force >/dev/null
    local json path mac
    json=$("$BIN" port add qbench guest --kind vhost-user --json)
    path=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])' <<<"$json")
    mac=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])' <<<"$json")
    NIC_ARGS=(-chardev "socket,id=c0,path=$path" -netdev vhost-user,id=net0,chardev=c0
        -device "virtio-net-device,netdev=net0,mac=$mac"
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem)
}

echo "| MTU | backend | download Gbit/s | upload Gbit/s | relay core-s/GB | guest vCPU % |"
echo "|---|---|---|---|---|---|"
for mtu in $MTUS; do
    declare -A D=() U=() C=() V=()
    backends="vmfabric"
    [ "$mtu" = 1500 ] && backends="vmfabric slirp"
    for _ in $(seq "$RUNS"); do
        for b in $backends; do
            case $b in
            vmfabric)
                vhost_user_args "$mtu"
                read -r d u c v < <(guest_run 10.241.0.254 "$DAEMON" "${NIC_ARGS[@]}") ;;
            slirp)
                read -r d u c v < <(guest_run 10.0.2.2 qemu -netdev user,id=net0 -device virtio-net-device,netdev=net0) ;;
            esac
            D[$b]+="$d " U[$b]+="$u " C[$b]+="$c " V[$b]+="$v "
        done
    done
    for b in $backends; do
        echo "| $mtu | $b | $(echo ${D[$b]} | median) (${D[$b]% }) | $(echo ${U[$b]} | median) (${U[$b]% }) | $(echo ${C[$b]} | median) | $(echo ${V[$b]} | median) |"
    done
done
