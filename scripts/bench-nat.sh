#!/usr/bin/env bash
# scripts/bench-nat.sh — NAT egress throughput and connect rate, vmfabric beside
# slirp4netns in one run (issue 4's benchmark). Needs root, iperf3 and slirp4netns.
#
# A "guest" network namespace reaches an iperf3 server on host loopback: through a
# vmfabric network's host-access address (TAP port, userspace switch, gateway), once per
# TCP engine (ENGINES: the splice onto host sockets, and the smoltcp stack), and through
# slirp4netns's 10.0.2.2. Each case runs RUNS times (10 s each, median),
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
ENGINES=${ENGINES:-splice stack}
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
need_packages iperf3 slirp4netns
bench_binary
WORK=$(mktemp -d)
export VMFABRIC_SOCKET=$WORK/api.sock
VNS=vfb$$
SNS=slbench$$
cleanup() {
    set +e
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null
    [ -n "${IPERF:-}" ] && kill "$IPERF" 2>/dev/null
    [ -n "${ACCEPTOR:-}" ] && kill "$ACCEPTOR" 2>/dev/null
    [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    for e in $ENGINES; do ip netns del "$VNS$e" 2>/dev/null; done
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


setup_vmfabric() { # mtu engine index: network bench-ENGINE, namespace $VNS$ENGINE
    local mtu=$1 e=$2 i=$3 ns=$VNS$2 tap=vfbtap$3
    "$BIN" network rm "bench-$e" --force >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    "$BIN" network create "bench-$e" --subnet "10.23$i.0.0/24" --mtu "$mtu" --host-access --tcp-engine "$e" --force >/dev/null
    local mac
    mac=$("$BIN" port add "bench-$e" guest --kind tap --ifname "$tap" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])')
    ip netns add "$ns"
    ip link set "$tap" netns "$ns"
    # The port is locked to its MAC and to the address it leases, as a VM's would be.
    ip -n "$ns" link set "$tap" address "$mac" mtu "$mtu" up
    printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface"; ip route add default via "$router" ;; esac\n' >"$WORK/udhcpc.sh"
    chmod 755 "$WORK/udhcpc.sh"
    ip netns exec "$ns" busybox udhcpc -i "$tap" -q -f -n -t 10 -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1
}

# The host-access address of engine number $1's network.
target_of() { echo "10.23$1.0.254"; }

setup_slirp() { # mtu
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null && wait "$SLIRP" 2>/dev/null || true
    ip netns del "$SNS" 2>/dev/null || true
    ip netns add "$SNS"
    slirp4netns --configure --mtu "$1" --netns-type=path "/var/run/netns/$SNS" tap0 >"$WORK/slirp.log" 2>&1 &
    SLIRP=$!
    for _ in $(seq 50); do ip -n "$SNS" addr show tap0 2>/dev/null | grep -q 10.0.2.100 && break; sleep 0.1; done
}

engines=($ENGINES)
header="| MTU | direction |"
rule="|---|---|"
for e in "${engines[@]}"; do header+=" vmfabric $e Gbit/s | CPU % |"; rule+="---|---|"; done
echo "$header slirp4netns Gbit/s | CPU % | ratio ${engines[0]}/slirp |"
echo "$rule---|---|---|"
declare -A RATE
for mtu in $MTUS; do
    for i in "${!engines[@]}"; do setup_vmfabric "$mtu" "${engines[$i]}" "$((i + 1))"; done
    setup_slirp "$mtu"
    for dir in up down; do
        flag=()
        [ "$dir" = down ] && flag=(-R)
        declare -A G=() C=()
        sg=() sc=()
        for _ in $(seq "$RUNS"); do
            for i in "${!engines[@]}"; do
                e=${engines[$i]}
                read -r g c < <(iperf_run "$VNS$e" "$(target_of $((i + 1)))" "$DAEMON" "${flag[@]}")
                G[$e]+="$g " C[$e]+="$c "
            done
            read -r g c < <(iperf_run "$SNS" 10.0.2.2 "$SLIRP" "${flag[@]}")
            sg+=("$g") sc+=("$c")
        done
        s=$(echo "${sg[*]}" | median)
        label="guest→host"
        [ "$dir" = down ] && label="host→guest"
        row="| $mtu | $label |"
        for e in "${engines[@]}"; do
            row+=" $(echo ${G[$e]} | median) (${G[$e]% }) | $(echo ${C[$e]} | median) |"
        done
        first=$(echo ${G[${engines[0]}]} | median)
        echo "$row $s (${sg[*]}) | $(echo "${sc[*]}" | median) | $(python3 -c "print('%.2f' % ($first / $s))")× |"
    done
    declare -A R=()
    sr=()
    for _ in $(seq "$RUNS"); do
        for i in "${!engines[@]}"; do R[${engines[$i]}]+="$(connect_rate "$VNS${engines[$i]}" "$(target_of $((i + 1)))") "; done
        sr+=("$(connect_rate "$SNS" 10.0.2.2)")
    done
    s=$(echo "${sr[*]}" | median)
    row="| $mtu |"
    for e in "${engines[@]}"; do row+=" $(echo ${R[$e]} | median) (${R[$e]% }) |"; done
    first=$(echo ${R[${engines[0]}]} | median)
    RATE[$mtu]="$row $s (${sr[*]}) | $(python3 -c "print('%.2f' % ($first / $s))")× |"
done
echo
echo "Connect/close per second, $SYNS sequential, median of $RUNS:"
echo
header="| MTU |"
rule="|---|"
for e in "${engines[@]}"; do header+=" vmfabric $e |"; rule+="---|"; done
echo "$header slirp4netns | ratio ${engines[0]}/slirp |"
echo "$rule---|---|"
for mtu in $MTUS; do echo "${RATE[$mtu]}"; done
