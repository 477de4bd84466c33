#!/usr/bin/env bash
# scripts/bench-nat.sh — NAT egress throughput and connect rate, vmfabric beside
# slirp4netns in one run (issue 4's benchmark). Needs root, iperf3 and slirp4netns.
#
# A "guest" network namespace reaches an iperf3 server on host loopback: through a
# vmfabric network's host-access address (TAP port, userspace switch, gateway TCP stack)
# and through slirp4netns's 10.0.2.2. Each case runs RUNS times (10 s each, median),
# interleaved so that machine noise hits both alike, both directions (-R: host to
# guest), at MTU 1500 and 65520, each followed by SYNS sequential connect/close pairs.
# CPU % is the relaying process's user+system time over the run (vmfabric: the whole
# daemon, switch and gateway; slirp4netns: its process). Output: a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
RUNS=${RUNS:-3}
SECS=${SECS:-10}
SYNS=${SYNS:-2000}
MTUS=${MTUS:-1500 65520}
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
need_packages iperf3 slirp4netns
bench_binary
WORK=$(mktemp -d)
export VMFABRIC_SOCKET=$WORK/api.sock
VNS=vfbench$$
SNS=slbench$$
cleanup() {
    set +e
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null
    [ -n "${IPERF:-}" ] && kill "$IPERF" 2>/dev/null
    [ -n "${ACCEPTOR:-}" ] && kill "$ACCEPTOR" 2>/dev/null
    [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    ip netns del "$VNS" 2>/dev/null
    ip netns del "$SNS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

start_daemon
iperf3 -s -B 127.0.0.1 -p 5301 >/dev/null 2>&1 &
IPERF=$!
# The connect-rate server: accepts and closes at once.
python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 5302)); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
' &
ACCEPTOR=$!
sleep 0.5


# One iperf3 run: prints "Gbit/s cpu%".
iperf_run() { # ns target pid [-R]
    local ns=$1 target=$2 pid=$3
    shift 3
    local t0 c0 t1 c1 json gbps
    t0=$(date +%s.%N)
    c0=$(cpu_ticks "$pid")
    json=$(ip netns exec "$ns" iperf3 -c "$target" -p 5301 -t "$SECS" -J "$@")
    c1=$(cpu_ticks "$pid")
    t1=$(date +%s.%N)
    gbps=$(python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))' <<<"$json")
    echo "$gbps $(python3 -c "print('%.0f' % (100 * ($c1 - $c0) / $HZ / ($t1 - $t0)))")"
}

connect_rate() { # ns target
    ip netns exec "$1" python3 -c '
import socket, sys, time
n, host = int(sys.argv[1]), sys.argv[2]
t = time.monotonic()
for _ in range(n):
    s = socket.create_connection((host, 5302)); s.close()
print("%.0f" % (n / (time.monotonic() - t)))
' "$SYNS" "$2"
}


setup_vmfabric() { # mtu
    "$BIN" network rm bench --force >/dev/null 2>&1 || true
    ip netns del "$VNS" 2>/dev/null || true
    "$BIN" network create bench --subnet 10.231.0.0/24 --mtu "$1" --host-access --force >/dev/null
    local mac
    mac=$("$BIN" port add bench guest --kind tap --ifname vfbtap0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])')
    ip netns add "$VNS"
    ip link set vfbtap0 netns "$VNS"
    # The port is locked to its MAC and to the address it leases, as a VM's would be.
    ip -n "$VNS" link set vfbtap0 address "$mac" mtu "$1" up
    printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface"; ip route add default via "$router" ;; esac\n' >"$WORK/udhcpc.sh"
    chmod 755 "$WORK/udhcpc.sh"
    ip netns exec "$VNS" busybox udhcpc -i vfbtap0 -q -f -n -t 10 -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1
}

setup_slirp() { # mtu
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null && wait "$SLIRP" 2>/dev/null || true
    ip netns del "$SNS" 2>/dev/null || true
    ip netns add "$SNS"
    slirp4netns --configure --mtu "$1" --netns-type=path "/var/run/netns/$SNS" tap0 >"$WORK/slirp.log" 2>&1 &
    SLIRP=$!
    for _ in $(seq 50); do ip -n "$SNS" addr show tap0 2>/dev/null | grep -q 10.0.2.100 && break; sleep 0.1; done
}

echo "| MTU | direction | vmfabric Gbit/s | vmfabric CPU % | slirp4netns Gbit/s | slirp4netns CPU % | ratio |"
echo "|---|---|---|---|---|---|---|"
declare -A RATE
for mtu in $MTUS; do
    setup_vmfabric "$mtu"
    setup_slirp "$mtu"
    for dir in up down; do
        flag=()
        [ "$dir" = down ] && flag=(-R)
        vg=() vc=() sg=() sc=()
        for _ in $(seq "$RUNS"); do
            read -r g c < <(iperf_run "$VNS" 10.231.0.254 "$DAEMON" "${flag[@]}")
            vg+=("$g") vc+=("$c")
            read -r g c < <(iperf_run "$SNS" 10.0.2.2 "$SLIRP" "${flag[@]}")
            sg+=("$g") sc+=("$c")
        done
        v=$(echo "${vg[*]}" | median) s=$(echo "${sg[*]}" | median)
        label="guest→host"
        [ "$dir" = down ] && label="host→guest"
        echo "| $mtu | $label | $v (${vg[*]}) | $(echo "${vc[*]}" | median) | $s (${sg[*]}) | $(echo "${sc[*]}" | median) | $(python3 -c "print('%.2f' % ($v / $s))")× |"
    done
    vr=() sr=()
    for _ in $(seq "$RUNS"); do
        vr+=("$(connect_rate "$VNS" 10.231.0.254)")
        sr+=("$(connect_rate "$SNS" 10.0.2.2)")
    done
    v=$(echo "${vr[*]}" | median) s=$(echo "${sr[*]}" | median)
    RATE[$mtu]="| $mtu | $v (${vr[*]}) | $s (${sr[*]}) | $(python3 -c "print('%.2f' % ($v / $s))")× |"
done
echo
echo "Connect/close per second, $SYNS sequential, median of $RUNS:"
echo
echo "| MTU | vmfabric | slirp4netns | ratio |"
echo "|---|---|---|---|"
for mtu in $MTUS; do echo "${RATE[$mtu]}"; done
