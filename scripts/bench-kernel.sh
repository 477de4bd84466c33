#!/usr/bin/env bash
# scripts/bench-kernel.sh — guest-to-guest TCP through a kernel-mode network (Linux
# bridge) and through a userspace network (vmfabric's switch), side by side in one run
# (issue 6's benchmark: the reference the userspace path is measured against). Needs
# root and iperf3.
#
# Userspace: two namespaces, each on a TAP port of a userspace network (the switch
# reads and writes the TAP devices). Kernel: two namespaces on the bridge of a
# kernel-mode network, each joined by a veth pair (what a VMM's TAP is to the bridge).
# iperf3 TCP, SECS seconds, RUNS runs interleaved, median; CPU % of the daemon.
# VMFABRIC_BIN measures another build (an earlier commit's, for a before/after).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_start iperf3
export VMFABRIC_SOCKET=$WORK/api.sock
P=kb$$
cleanup() {
    set +e
    # The iperf3 servers hold their namespaces (and the veth pairs) alive.
    for f in "$WORK"/iperf-*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
    for ns in ${P}u0 ${P}u1 ${P}k0 ${P}k1; do ip netns del "$ns" 2>/dev/null; done
    "$BIN" network rm kbench --force >/dev/null 2>&1
    [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
start_daemon

"$BIN" network create ubench --subnet 10.232.0.0/24 --force >/dev/null
"$BIN" network create kbench --subnet 10.233.0.0/24 --mode kernel --force >/dev/null
BRIDGE=$(ip -d -o link show | awk -F': ' '/alias vmfabric:.* network kbench/ {print $2; exit}')
# A userspace port is locked as a VM's would be: the namespace takes the port's MAC
# and a lease (a static address would be dropped as spoofed).
printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface" ;; esac\n' >"$WORK/udhcpc.sh"
chmod 755 "$WORK/udhcpc.sh"
for i in 0 1; do
    mac=$("$BIN" port add ubench "g$i" --kind tap --ifname "${P}t$i" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])')
    ip netns add "${P}u$i"
    ip link set "${P}t$i" netns "${P}u$i"
    ip -n "${P}u$i" link set "${P}t$i" address "$mac" up
    ip netns exec "${P}u$i" busybox udhcpc -i "${P}t$i" -q -f -n -t 10 -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1
    ip netns add "${P}k$i"
    ip link add "${P}v$i" type veth peer name eth0 netns "${P}k$i"
    ip link set "${P}v$i" master "$BRIDGE" up
    ip -n "${P}k$i" addr add "10.233.0.1$i/24" dev eth0
    ip -n "${P}k$i" link set eth0 up
done
U1=$(ip -n "${P}u1" -4 -o addr show dev "${P}t1" | awk '{print $4}' | cut -d/ -f1)
ip netns exec "${P}u1" iperf3 -s -D -B "$U1" -I "$WORK/iperf-u.pid" >/dev/null
ip netns exec "${P}k1" iperf3 -s -D -B 10.233.0.11 -I "$WORK/iperf-k.pid" >/dev/null
sleep 0.5

run_one() { # client-ns server-ip
    local t0 c0 json
    t0=$(date +%s.%N); c0=$(cpu_ticks "$DAEMON")
    json=$(ip netns exec "$1" iperf3 -c "$2" -t "$SECS" -J)
    python3 -c '
import json, sys
d = json.loads(sys.argv[1]); t0, c0, c1, hz = map(float, sys.argv[2:6])
import time
print("%.2f %.0f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9, 100 * (c1 - c0) / hz / (time.time() - t0)))
' "$json" "$t0" "$c0" "$(cpu_ticks "$DAEMON")" "$HZ"
}
ug=() uc=() kg=() kc=()
for _ in $(seq "$RUNS"); do
    read -r g c < <(run_one "${P}u0" "$U1"); ug+=("$g") uc+=("$c")
    read -r g c < <(run_one "${P}k0" 10.233.0.11); kg+=("$g") kc+=("$c")
done
echo "| path | Gbit/s (median; runs) | vmfabric daemon CPU % |"
echo "|---|---|---|"
echo "| kernel-mode network (Linux bridge) | $(echo "${kg[*]}" | median) (${kg[*]}) | $(echo "${kc[*]}" | median) |"
echo "| userspace network (vmfabric switch, TAP ports) | $(echo "${ug[*]}" | median) (${ug[*]}) | $(echo "${uc[*]}" | median) |"
