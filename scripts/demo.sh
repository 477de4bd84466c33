#!/usr/bin/env bash
# scripts/demo.sh — vmfabric's main job on this machine: the daemon with its default
# network ("default", 10.77.0.0/24 and fd00:77::/64, with its gateway: DHCP, DNS,
# ARP/ICMP, NAT, IPv6 router advertisements; host access switched on by the demo's
# config file so guests reach the host's loopback at 10.77.0.254) and two real QEMU
# guests it runs on that network. Both get their address from vmfabric's DHCP and
# form an IPv6 one; "web" serves HTTP; "client" resolves web by name, pings the
# gateway and web (also over IPv6, by web's AAAA), fetches web's page, and fetches a
# page from a server on the host's loopback through the gateway's NAT; the host
# fetches web's page through a port forward. vmfabric keeps running afterwards, with the commands to inspect and
# stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
echo "[demo] building vmfabric (release)"
cargo build --release -q -p vmfabric
guest/build.sh target/guest
BIN=$PWD/target/release/vmfabric
RUN=${VMFABRIC_RUN_DIR:-/tmp/vmfabric-demo}
if [ -f "$RUN/vmfabric.pid" ] && kill -0 "$(cat "$RUN/vmfabric.pid")" 2>/dev/null; then
    echo "[demo] stopping the previous demo's vmfabric"
    old=$(cat "$RUN/vmfabric.pid"); kill "$old"
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
fi
[ -f "$RUN/host-web.pid" ] && kill "$(cat "$RUN/host-web.pid")" 2>/dev/null || true
rm -rf "$RUN"; mkdir -p "$RUN"
cat > "$RUN/vmfabric.toml" <<'TOML'
[[network]]
name = "default"
subnet = "10.77.0.0/24"
ipv6 = "fd00:77::/64"
host_access = true
TOML
# A web server on the host's loopback only (busybox httpd), for the client to reach.
HOST_PORT=${VMFABRIC_DEMO_HOST_PORT:-18080}
mkdir -p "$RUN/host-www"
echo "hello from the host's loopback (127.0.0.1:$HOST_PORT)" > "$RUN/host-www/index.html"
setsid busybox httpd -f -p "127.0.0.1:$HOST_PORT" -h "$RUN/host-www" >/dev/null 2>&1 </dev/null &
echo $! > "$RUN/host-web.pid"

SOCK=$RUN/vmfabric.sock
export VMFABRIC_SOCKET=$SOCK   # every vmfabric command below talks to this daemon
vmf() { "$BIN" "$@"; }
echo "[demo] starting the vmfabric daemon (log: $RUN/vmfabric.log, state: $RUN/state)"
setsid "$BIN" serve --socket "$SOCK" --state-dir "$RUN/state" --run-dir "$RUN" \
    --guest-dir "$PWD/target/guest" --config "$RUN/vmfabric.toml" > "$RUN/vmfabric.log" 2>&1 < /dev/null &
echo $! > "$RUN/vmfabric.pid"
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
echo "[demo] \$ vmfabric network ls"
vmf network ls | sed 's/^/  /'

echo "[demo] \$ vmfabric vm run --net default --name web --http --wait"
vmf vm run --net default --name web --http --wait | sed 's/^/  /'
V6_READY='for i in $(seq 100); do ip -6 addr show scope global | grep -q inet6 && break; sleep 0.1; done'
CLIENT_CMD="nslookup web; ping -c 2 gateway; ping -c 3 web && wget -qO- http://web/; $V6_READY; ping6 -c 2 web; wget -qO- http://10.77.0.254:$HOST_PORT/"
echo "[demo] \$ vmfabric vm run --net default --name client --wait -- '$CLIENT_CMD'"
vmf vm run --net default --name client --wait -- "$CLIENT_CMD" | sed 's/^/  /'
for _ in $(seq 300); do vmf vm logs client | grep -q VMFABRIC_END && break; sleep 0.2; done
echo "[demo] \$ vmfabric vm logs client   (the guest's console)"
vmf vm logs client | grep -aE '^(VMFABRIC|PING|64 bytes|[0-9]+ packets|round-trip|hello|Name:|Address)' | sed 's/^/  client| /'
WEB_IP=$(vmf vm ls | awk '$1 == "web" {for (i = 2; i <= NF; i++) if ($i ~ /^10\.77\./) print $i}')
if [ -n "$WEB_IP" ]; then
    echo "[demo] \$ vmfabric forward add default 127.0.0.1:18081 $WEB_IP:80   (TCP, host to guest)"
    vmf forward add default 127.0.0.1:18081 "$WEB_IP:80" | sed 's/^/  /'
    echo "[demo] \$ wget -qO- http://127.0.0.1:18081/   (from the host)"
    busybox wget -qO- http://127.0.0.1:18081/ | sed 's/^/  /'
fi
echo "[demo] \$ vmfabric lease ls default"
vmf lease ls default | sed 's/^/  /'
echo "[demo] \$ vmfabric vm ls"
vmf vm ls | sed 's/^/  /'
kill -USR1 "$(cat "$RUN/vmfabric.pid")"; sleep 0.3
echo "[demo] the daemon's counters (kill -USR1):"
tac "$RUN/vmfabric.log" | awk '{print} /^network default/{exit}' | tac | sed 's/^/  /'
cat <<MSG

[demo] vmfabric is still running (pid $(cat "$RUN/vmfabric.pid")) with VM "web"; API on $SOCK.
  inspect:   VMFABRIC_SOCKET=$SOCK $BIN vm ls   (also: network ls, port ls default, lease ls default, stats)
  more VMs:  VMFABRIC_SOCKET=$SOCK $BIN vm run --net default --name NAME --wait
  stop it:   kill $(cat "$RUN/vmfabric.pid") $(cat "$RUN/host-web.pid")      (the daemon stops its VMs too; the other is the host's demo web server)
MSG
