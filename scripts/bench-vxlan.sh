#!/usr/bin/env bash
# scripts/bench-vxlan.sh — guest-to-guest traffic between two nodes over VXLAN: through
# vmfabric's userspace tunnels (two daemons joined into a cluster, a cluster network,
# guests on TAP ports) and through the Linux kernel's vxlan devices on bridges (the
# reference), side by side in one run (issue 17's benchmark). Needs root, iperf3 and
# etcd (etcd-server).
#
# Two "hosts" are network namespaces on an underlay bridge (MTU 1500); each has, for
# the kernel path, a bridge with a vxlan device (VNI 4242, UDP 4790) and a veth to a
# guest namespace, and for the userspace path a vmfabric daemon (VXLAN on UDP 4789)
# with a TAP port moved into a guest namespace. Guests' MTU 1450 on both paths.
# iperf3 TCP (Gbit/s) and UDP with 64-byte payloads (frames/s received), SECS seconds,
# RUNS runs interleaved, median; CPU % of both daemons together; and for TCP, the whole
# machine's busy processors and the gigabits each busy processor-second carried: what
# a path costs, which decides the ratio once both paths have every processor busy.
# VMFABRIC_BIN measures another build. SWITCH_THREAD_HOOK, a diagnostic, is a command
# run with each daemon's switch thread id before the runs (e.g. "chrt -b -p 0").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_start iperf3 etcd-server busybox-static
P=vb$$
UNDER=10.201.77
cleanup() {
    set +e
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
    for pid in ${DAEMONS:-} ${ETCD:-}; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    for ns in ${P}h1 ${P}h2 ${P}u1 ${P}u2 ${P}k1 ${P}k2; do ip netns del "$ns" 2>/dev/null; done
    ip link del ${P}br 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# The underlay.
ip link add ${P}br type bridge
ip addr add $UNDER.1/24 dev ${P}br
ip link set ${P}br up
for i in 1 2; do
    ip netns add ${P}h$i
    ip link add ${P}o$i type veth peer name under netns ${P}h$i
    ip link set ${P}o$i master ${P}br up
    ip -n ${P}h$i addr add $UNDER.1$i/24 dev under
    ip -n ${P}h$i link set under up
    ip -n ${P}h$i link set lo up
done

# Kernel path: in each host, a bridge with a vxlan device to the other host and a
# veth to a guest namespace.
for i in 1 2; do
    other=$((3 - i))
    h=${P}h$i
    ip -n $h link add vx type vxlan id 4242 dstport 4790 local $UNDER.1$i remote $UNDER.1$other
    ip -n $h link add vxbr type bridge
    ip -n $h link set vx master vxbr up
    ip netns add ${P}k$i
    ip -n $h link add kv type veth peer name eth0 netns ${P}k$i
    ip -n $h link set kv master vxbr up
    ip -n $h link set vxbr up
    ip -n ${P}k$i link set eth0 mtu 1450
    ip -n ${P}k$i addr add 10.204.77.$i/24 dev eth0
    ip -n ${P}k$i link set eth0 up
done

# Userspace path: etcd on the underlay, a daemon per host, a cluster network.
etcd --name b --data-dir "$WORK/etcd" --listen-client-urls http://$UNDER.1:23790 \
    --advertise-client-urls http://$UNDER.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster b=http://127.0.0.1:23800 \
    >"$WORK/etcd.log" 2>&1 &
ETCD=$!
for _ in $(seq 100); do curl -sf http://$UNDER.1:23790/health >/dev/null && break; sleep 0.1; done
DAEMONS=
for i in 1 2; do
    ip netns exec ${P}h$i "$BIN" serve --socket "$WORK/h$i.sock" --state-dir "$WORK/s$i" \
        --run-dir "$WORK/r$i" --cluster-endpoints http://$UNDER.1:23790 --node h$i \
        --underlay $UNDER.1$i >"$WORK/daemon$i.log" 2>&1 &
    DAEMONS="$DAEMONS $!"
    for _ in $(seq 100); do [ -S "$WORK/h$i.sock" ] && break; sleep 0.1; done
done
VMFABRIC_SOCKET=$WORK/h1.sock "$BIN" network create vx --subnet 10.203.77.0/24 --mtu 1450 --scope cluster >/dev/null
for _ in $(seq 100); do VMFABRIC_SOCKET=$WORK/h2.sock "$BIN" network show vx >/dev/null 2>&1 && break; sleep 0.2; done
printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr add "$ip/$mask" dev "$interface" ;; esac\n' >"$WORK/udhcpc.sh"
chmod 755 "$WORK/udhcpc.sh"
for i in 1 2; do
    mac=$(VMFABRIC_SOCKET=$WORK/h$i.sock "$BIN" port add vx g$i --kind tap --ifname ${P}t$i --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["mac"])')
    ip netns add ${P}u$i
    ip -n ${P}h$i link set ${P}t$i netns ${P}u$i
    ip -n ${P}u$i link set ${P}t$i address "$mac" mtu 1450 up
    ip netns exec ${P}u$i busybox udhcpc -i ${P}t$i -q -f -n -t 10 -T 1 -s "$WORK/udhcpc.sh" >/dev/null 2>&1
done
U2=$(ip -n ${P}u2 -4 -o addr show dev ${P}t2 | awk '{print $4}' | cut -d/ -f1)
# The tunnels learn where each guest lives from etcd: wait until they reach each other.
for _ in $(seq 50); do ip netns exec ${P}u1 busybox ping -c 1 -W 1 "$U2" >/dev/null 2>&1 && break; done
ip netns exec ${P}u2 iperf3 -s -D -B "$U2" -I "$WORK/iperf-u.pid" >/dev/null
ip netns exec ${P}k2 iperf3 -s -D -B 10.204.77.2 -I "$WORK/iperf-k.pid" >/dev/null
sleep 0.5

daemon_ticks() { local t=0; for p in $DAEMONS; do t=$((t + $(cpu_ticks "$p"))); done; echo $t; }

run_one() { # client-ns server-ip tcp|udp -> rate, daemons' CPU %, busy processors
    local t0 c0 b0 json args=()
    [ "$3" = udp ] && args=(-u -b 0 -l 64)
    t0=$(date +%s.%N); c0=$(daemon_ticks); b0=$(busy_ticks)
    json=$(ip netns exec "$1" iperf3 -c "$2" -t "$SECS" "${args[@]}" -J)
    python3 -c '
import json, sys, time
d = json.loads(sys.argv[1]); kind = sys.argv[2]; t0, c0, c1, b0, b1, hz = map(float, sys.argv[3:9])
secs = time.time() - t0
cpu = 100 * (c1 - c0) / hz / secs
busy = (b1 - b0) / hz / secs
if kind == "tcp":
    print("%.2f %.0f %.2f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9, cpu, busy))
else:
    s = d["end"]["sum"]
    print("%.0f %.0f %.2f" % ((s["packets"] - s["lost_packets"]) / s["seconds"], cpu, busy))
' "$json" "$3" "$t0" "$c0" "$(daemon_ticks)" "$b0" "$(busy_ticks)" "$HZ"
}
if [ -n "${SWITCH_THREAD_HOOK:-}" ]; then
    for p in $DAEMONS; do
        for t in /proc/"$p"/task/*; do
            if [ "$(cat "$t/comm")" = fabric-switch ]; then $SWITCH_THREAD_HOOK "${t##*/}"; fi
        done
    done
fi
ut=() utc=() utb=() kt=() ktb=() uu=() uuc=() ku=()
for _ in $(seq "$RUNS"); do
    read -r v c b < <(run_one ${P}u1 "$U2" tcp); ut+=("$v") utc+=("$c") utb+=("$b")
    read -r v _ b < <(run_one ${P}k1 10.204.77.2 tcp); kt+=("$v") ktb+=("$b")
    read -r v c _ < <(run_one ${P}u1 "$U2" udp); uu+=("$v") uuc+=("$c")
    read -r v _ _ < <(run_one ${P}k1 10.204.77.2 udp); ku+=("$v")
done
med() { echo "$@" | median; }
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
# Gigabits per busy processor-second, run by run: rates and busy processors in order.
per_busy() { python3 -c 'import sys; h = len(sys.argv) // 2; print(" ".join("%.2f" % (float(r) / float(b)) for r, b in zip(sys.argv[1:h + 1], sys.argv[h + 1:])))' "$@"; }
ke=$(per_busy "${kt[@]}" "${ktb[@]}") ue=$(per_busy "${ut[@]}" "${utb[@]}")
echo "| path | TCP Gbit/s (median; runs) | UDP 64 B frames/s received (median; runs) | daemons' CPU % (TCP, UDP) | busy processors, TCP (median) | TCP Gbit per busy processor-second (median; runs) |"
echo "|---|---|---|---|---|---|"
echo "| Linux vxlan + bridge | $(med "${kt[*]}") (${kt[*]}) | $(med "${ku[*]}") (${ku[*]}) | — | $(med "${ktb[*]}") | $(med "$ke") ($ke) |"
echo "| vmfabric userspace VXLAN | $(med "${ut[*]}") (${ut[*]}) | $(med "${uu[*]}") (${uu[*]}) | $(med "${utc[*]}"), $(med "${uuc[*]}") | $(med "${utb[*]}") | $(med "$ue") ($ue) |"
echo "| vmfabric / Linux | $(ratio "$(med "${ut[*]}")" "$(med "${kt[*]}")") | $(ratio "$(med "${uu[*]}")" "$(med "${ku[*]}")") | | | $(ratio "$(med "$ue")" "$(med "$ke")") |"
# What the tunnels counted (refusals and drops would explain a slow row).
for i in 1 2; do
    echo "node h$i:" >&2
    curl -s --unix-socket "$WORK/h$i.sock" http://vmfabric/metrics |
        grep -E '^vmfabric_(vxlan_total|port_drops_total|network_drops_total)' | grep -v ' 0$' >&2 || true
    # Datagrams the host's UDP stack dropped for a full socket buffer (both paths).
    ip netns exec ${P}h$i awk '/^Udp:/ { if (!n++) split($0, k); else for (i = 2; i <= NF; i++)
        if (k[i] ~ /bufErrors/) print "  udp " k[i] " " $i }' /proc/net/snmp >&2
done
