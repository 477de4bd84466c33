#!/usr/bin/env bash
# scripts/bench-nat.sh — NAT egress throughput and connect rate, vmfabric beside
# slirp4netns and pasta in one run. Needs root; installs iperf3, slirp4netns and passt.
#
# A "guest" network namespace reaches an iperf3 server on host loopback: through a
# vmfabric network's host-access address (TAP port, userspace switch, gateway), once per
# TCP engine (ENGINES: the splice onto host sockets, and the smoltcp stack), through
# slirp4netns's 10.0.2.2, and through pasta's gateway address (mapped to the host's
# loopback). Each case runs RUNS times (SECS each, median), interleaved so that machine
# noise hits all alike, both directions (-R: host to guest), at MTU 1500 and 65520, each
# followed by SYNS sequential connect/close pairs (target/release/connect-rate, native:
# an interpreter's client would share the cores with the relay it measures). Ratios are
# against slirp4netns (the issues' anchor). CPU % is the relaying process's user+system
# time over the run (vmfabric: the whole daemon, switch and gateway; slirp4netns and
# pasta: their process). Output: markdown tables.
#
# FAMILY=6 runs the same over IPv6: the vmfabric network gets a /64 (the guest forms
# its address from the gateway's advertisements) and the guest reaches the host's [::1]
# at the prefix's ::2; slirp4netns runs with --enable-ipv6 and is reached at fd00::2;
# pasta at its IPv6 gateway (when the host has IPv6 routes for it to copy).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
SYNS=${SYNS:-2000}
MTUS=${MTUS:-1500 65520}
ENGINES=${ENGINES:-splice stack}
FAMILY=${FAMILY:-4}
[ "$FAMILY" = 6 ] && ENGINES=${ENGINES/stack/}   # the stack engine carries IPv4 only
bench_start iperf3 slirp4netns passt
cargo build --release -q -p testkit --bin connect-rate
CONNECT_RATE=$PWD/target/release/connect-rate
export VMFABRIC_SOCKET=$WORK/api.sock
VNS=vfb$$
SNS=slbench$$
PNS=ptbench$$
cleanup() {
    set +e
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null
    [ -n "${PASTA:-}" ] && kill "$PASTA" 2>/dev/null
    [ -n "${IPERF:-}" ] && kill "$IPERF" 2>/dev/null
    [ -n "${ACCEPTOR:-}" ] && kill "$ACCEPTOR" 2>/dev/null
    [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    for e in $ENGINES; do ip netns del "$VNS$e" 2>/dev/null; done
    ip netns del "$SNS" 2>/dev/null
    ip netns del "$PNS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

start_daemon
LOOPBACK=127.0.0.1
[ "$FAMILY" = 6 ] && LOOPBACK=::1
iperf3 -s -B "$LOOPBACK" -p 5301 >/dev/null 2>&1 &
IPERF=$!
# The connect-rate server: accepts and closes at once.
"$CONNECT_RATE" serve "$(hostport "$LOOPBACK" 5302)" &
ACCEPTOR=$!
sleep 0.5


# One iperf3 run: prints "Gbit/s cpu%".
iperf_run() { # ns target pid [-R]
    local ns=$1 target=$2 pid=$3
    shift 3
    local t0 c0 t1 c1 json gbps
    t0=$(date +%s.%N)
    c0=$(cpu_ticks "$pid")
    json=$(ip netns exec "$ns" iperf3 -c "$target" -p 5301 -t "$SECS" -J "$@" || true)
    c1=$(cpu_ticks "$pid")
    t1=$(date +%s.%N)
    gbps=$(python3 -c 'import json,sys
j = json.load(sys.stdin)
if "error" in j: sys.exit("iperf3 in %s to %s: %s" % (sys.argv[1], sys.argv[2], j["error"]))
print("%.2f" % (j["end"]["sum_received"]["bits_per_second"] / 1e9))' "$ns" "$target" <<<"$json")
    echo "$gbps $(python3 -c "print('%.0f' % (100 * ($c1 - $c0) / $HZ / ($t1 - $t0)))")"
}

# Connections per second. Each run's closed connections wait out TIME_WAIT in the
# guest's namespace, and a guest kernel with tens of thousands of them spends its time
# searching for a free port (measured: 25 s of system time for 10,000 connects), so
# keep RUNS * SYNS well under the ~14,000 ports a connect may pick.
connect_rate() { # ns target
    ip netns exec "$1" "$CONNECT_RATE" "$(hostport "$2" 5302)" "$SYNS" | cut -d' ' -f1
}


setup_vmfabric() { # mtu engine index: network bench-ENGINE, namespace $VNS$ENGINE
    local mtu=$1 e=$2 i=$3 ns=$VNS$2 tap=vfbtap$3
    "$BIN" network rm "bench-$e" --force >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    local v6=()
    [ "$FAMILY" = 6 ] && v6=(--ipv6 "fd00:23$i::/64")
    "$BIN" network create "bench-$e" --subnet "10.23$i.0.0/24" --mtu "$mtu" --host-access --tcp-engine "$e" "${v6[@]}" --force >/dev/null
    local mac
    mac=$("$BIN" port add "bench-$e" guest --kind tap --ifname "$tap" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])')
    ip netns add "$ns"
    ip link set "$tap" netns "$ns"
    # The port is locked to its MAC and to the address it leases, as a VM's would be.
    ip -n "$ns" link set "$tap" address "$mac" mtu "$mtu" up
    printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface"; ip route add default via "$router" ;; esac\n' >"$WORK/udhcpc.sh"
    chmod 755 "$WORK/udhcpc.sh"
    ip netns exec "$ns" busybox udhcpc -i "$tap" -q -f -n -t 10 -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1
    [ "$FAMILY" = 6 ] && wait_for_default6 "$ns"
    return 0
}

# Waits until a namespace has an IPv6 default route (from a Router Advertisement) and a
# global address past duplicate address detection.
wait_for_default6() { # ns
    for _ in $(seq 100); do
        ip -n "$1" -6 route show default | grep -q via \
            && ip -n "$1" -6 addr show scope global | grep -v tentative | grep -q inet6 && return 0
        sleep 0.2
    done
    echo "no IPv6 default route in $1" >&2
    exit 1
}

# The host-access address of engine number $1's network.
target_of() { if [ "$FAMILY" = 6 ]; then echo "fd00:23$1::2"; else echo "10.23$1.0.254"; fi; }

setup_slirp() { # mtu
    [ -n "${SLIRP:-}" ] && kill "$SLIRP" 2>/dev/null && wait "$SLIRP" 2>/dev/null || true
    ip netns del "$SNS" 2>/dev/null || true
    ip netns add "$SNS"
    local v6=()
    [ "$FAMILY" = 6 ] && v6=(--enable-ipv6)
    slirp4netns --configure --mtu "$1" "${v6[@]}" --netns-type=path "/var/run/netns/$SNS" tap0 >"$WORK/slirp.log" 2>&1 &
    SLIRP=$!
    for _ in $(seq 50); do ip -n "$SNS" addr show tap0 2>/dev/null | grep -q 10.0.2.100 && break; sleep 0.1; done
    [ "$FAMILY" = 6 ] && wait_for_default6 "$SNS"
    return 0
}
SLIRP_HOST=10.0.2.2
[ "$FAMILY" = 6 ] && SLIRP_HOST=fd00::2

# pasta copies the host's address and routes into the namespace; its default gateway
# stands for the host's loopback there. As root it would drop to "nobody", who cannot
# enter a namespace root made: --runas 0.
setup_pasta() { # mtu; sets PASTA and PASTA_GW
    [ -n "${PASTA:-}" ] && kill "$PASTA" 2>/dev/null || true
    ip netns del "$PNS" 2>/dev/null || true
    ip netns add "$PNS"
    pasta --quiet --config-net --runas 0 -m "$1" --netns "/var/run/netns/$PNS" -P "$WORK/pasta.pid" >"$WORK/pasta.log" 2>&1
    PASTA=$(cat "$WORK/pasta.pid")
    if [ "$FAMILY" = 6 ]; then
        # The host's gateway as pasta copied it; a link-local one with its interface's
        # index as the scope (iperf3 and the connect-rate client both parse that).
        local gw dev
        read -r gw dev < <(ip -n "$PNS" -6 route show default | awk '{print $3, $5; exit}') || true
        PASTA_GW=${gw:-}
        [[ $PASTA_GW == fe80:* ]] && PASTA_GW="$gw%$(ip -n "$PNS" -o link show dev "$dev" | cut -d: -f1)"
    else
        PASTA_GW=$(ip -n "$PNS" route show default | awk '{print $3; exit}')
    fi
    [ -n "$PASTA_GW" ] || { cat "$WORK/pasta.log" >&2; echo "pasta configured no default route" >&2; exit 1; }
}

engines=($ENGINES)
header="| MTU | direction |"
rule="|---|---|"
# CPU: the relay's % of one core, and in brackets core-seconds per GB moved.
for e in "${engines[@]}"; do header+=" vmfabric $e Gbit/s | CPU % (s/GB) |"; rule+="---|---|"; done
echo "$header slirp4netns Gbit/s | CPU % (s/GB) | pasta Gbit/s | CPU % (s/GB) | ratio ${engines[0]}/slirp |"
echo "$rule---|---|---|---|---|"
declare -A RATE
for mtu in $MTUS; do
    for i in "${!engines[@]}"; do setup_vmfabric "$mtu" "${engines[$i]}" "$((i + 1))"; done
    setup_slirp "$mtu"
    setup_pasta "$mtu"
    for dir in up down; do
        flag=()
        [ "$dir" = down ] && flag=(-R)
        declare -A G=() C=()
        for _ in $(seq "$RUNS"); do
            for i in "${!engines[@]}"; do
                e=${engines[$i]}
                read -r g c < <(iperf_run "$VNS$e" "$(target_of $((i + 1)))" "$DAEMON" "${flag[@]}")
                G[$e]+="$g " C[$e]+="$c "
            done
            read -r g c < <(iperf_run "$SNS" "$SLIRP_HOST" "$SLIRP" "${flag[@]}")
            G[slirp]+="$g " C[slirp]+="$c "
            read -r g c < <(iperf_run "$PNS" "$PASTA_GW" "$PASTA" "${flag[@]}")
            G[pasta]+="$g " C[pasta]+="$c "
        done
        label="guest→host"
        [ "$dir" = down ] && label="host→guest"
        row="| $mtu | $label |"
        for e in "${engines[@]}" slirp pasta; do
            g=$(echo ${G[$e]} | median) c=$(echo ${C[$e]} | median)
            row+=" $g (${G[$e]% }) | $c ($(python3 -c "print('%.2f' % (($c / 100) / max($g / 8, 1e-9)))")) |"
        done
        first=$(echo ${G[${engines[0]}]} | median)
        s=$(echo ${G[slirp]} | median)
        echo "$row $(python3 -c "print('%.2f' % ($first / $s))")× |"
    done
    declare -A R=()
    for _ in $(seq "$RUNS"); do
        for i in "${!engines[@]}"; do R[${engines[$i]}]+="$(connect_rate "$VNS${engines[$i]}" "$(target_of $((i + 1)))") "; done
        R[slirp]+="$(connect_rate "$SNS" "$SLIRP_HOST") "
        R[pasta]+="$(connect_rate "$PNS" "$PASTA_GW") "
    done
    row="| $mtu |"
    for e in "${engines[@]}" slirp pasta; do row+=" $(echo ${R[$e]} | median) (${R[$e]% }) |"; done
    first=$(echo ${R[${engines[0]}]} | median)
    s=$(echo ${R[slirp]} | median)
    RATE[$mtu]="$row $(python3 -c "print('%.2f' % ($first / $s))")× |"
done
echo
echo "Connect/close per second, $SYNS sequential, median of $RUNS:"
echo
header="| MTU |"
rule="|---|"
for e in "${engines[@]}"; do header+=" vmfabric $e |"; rule+="---|"; done
echo "$header slirp4netns | pasta | ratio ${engines[0]}/slirp |"
echo "$rule---|---|---|"
for mtu in $MTUS; do echo "${RATE[$mtu]}"; done
