#!/usr/bin/env bash
# scripts/demo.sh — vmfabric's main job on this machine: network "default"
# (10.77.0.0/24) with its gateway (DHCP, DNS, ARP/ICMP), and two real QEMU guests on
# it. Both get their address from vmfabric's DHCP; "web" serves HTTP on a unixgram
# port; "client", on a stream port, pings the gateway and web by name and fetches
# web's page. vmfabric keeps running afterwards, with the commands to inspect and stop
# it.
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
    kill "$(cat "$RUN/vmfabric.pid")"; sleep 0.5
fi
rm -rf "$RUN"; mkdir -p "$RUN"

echo "[demo] starting vmfabric serve (log: $RUN/vmfabric.log)"
setsid "$BIN" serve --run-dir "$RUN" --dgram-port web --stream-port client > "$RUN/vmfabric.log" 2>&1 < /dev/null &
echo $! > "$RUN/vmfabric.pid"
for _ in $(seq 100); do [ -S "$RUN/ports/client.stream" ] && break; sleep 0.1; done
sed -n '1,/^Stop with/p' "$RUN/vmfabric.log"

echo "[demo] booting guest 'web' (DHCP, HTTP server) on the unixgram port"
setsid "$BIN" boot-guest --guest-dir target/guest --dgram "$RUN/ports/web.sock" \
    --hostname web --http > "$RUN/web.console" 2>&1 < /dev/null &
WEB=$!
for _ in $(seq 300); do grep -q VMFABRIC_READY "$RUN/web.console" 2>/dev/null && break; sleep 0.1; done
echo "  web| $(grep -a VMFABRIC_READY "$RUN/web.console" || echo 'no readiness marker')"
echo "[demo] booting guest 'client' (DHCP) on the stream port: resolve web, ping it, fetch its page"
"$BIN" boot-guest --guest-dir target/guest --stream "$RUN/ports/client.stream" --hostname client \
    --cmd 'cat /etc/resolv.conf; nslookup web; ping -c 2 gateway; ping -c 3 web && wget -qO- http://web/' \
    2>&1 | grep -E '^(VMFABRIC|PING|64 bytes|[0-9]+ packets|round-trip|hello|nameserver|search|Name:|Address)' | sed 's/^/  client| /'
kill "$WEB" 2>/dev/null || true
wait "$WEB" 2>/dev/null || true

kill -USR1 "$(cat "$RUN/vmfabric.pid")"; sleep 0.3
echo "[demo] vmfabric's counters and leases:"
tac "$RUN/vmfabric.log" | awk '/^gateway: /{p=1} p{print} /^port +rx_frames/{exit}' | tac | sed 's/^/  /'
cat <<MSG

[demo] vmfabric is still running (pid $(cat "$RUN/vmfabric.pid")), serving $RUN/ports/*.
  counters:  kill -USR1 $(cat "$RUN/vmfabric.pid"); tail $RUN/vmfabric.log
  stop it:   kill $(cat "$RUN/vmfabric.pid")
MSG
