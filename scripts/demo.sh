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

SOCK=$RUN/vmfabric.sock
echo "[demo] starting the vmfabric daemon (log: $RUN/vmfabric.log, state: $RUN/state)"
setsid "$BIN" serve --socket "$SOCK" --state-dir "$RUN/state" --run-dir "$RUN" \
    --dgram-port web --stream-port client > "$RUN/vmfabric.log" 2>&1 < /dev/null &
echo $! > "$RUN/vmfabric.pid"
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
echo "[demo] \$ vmfabric network ls"
"$BIN" network ls --socket "$SOCK" | sed 's/^/  /'
echo "[demo] \$ vmfabric port ls default"
"$BIN" port ls default --socket "$SOCK" | sed 's/^/  /'

echo "[demo] booting guest 'web' (DHCP, HTTP server) on the unixgram port"
setsid "$BIN" boot-guest --guest-dir target/guest --dgram "$RUN/ports/default/web.sock" \
    --hostname web --http > "$RUN/web.console" 2>&1 < /dev/null &
WEB=$!
for _ in $(seq 300); do grep -q VMFABRIC_READY "$RUN/web.console" 2>/dev/null && break; sleep 0.1; done
echo "  web| $(grep -a VMFABRIC_READY "$RUN/web.console" || echo 'no readiness marker')"
echo "[demo] booting guest 'client' (DHCP) on the stream port: resolve web, ping it, fetch its page"
"$BIN" boot-guest --guest-dir target/guest --stream "$RUN/ports/default/client.stream" --hostname client \
    --cmd 'cat /etc/resolv.conf; nslookup web; ping -c 2 gateway; ping -c 3 web && wget -qO- http://web/' \
    2>&1 | grep -E '^(VMFABRIC|PING|64 bytes|[0-9]+ packets|round-trip|hello|nameserver|search|Name:|Address)' | sed 's/^/  client| /'
kill "$WEB" 2>/dev/null || true
wait "$WEB" 2>/dev/null || true

echo "[demo] \$ vmfabric lease ls default"
"$BIN" lease ls default --socket "$SOCK" | sed 's/^/  /'
kill -USR1 "$(cat "$RUN/vmfabric.pid")"; sleep 0.3
echo "[demo] the daemon's counters (kill -USR1):"
tac "$RUN/vmfabric.log" | awk '{print} /^network default/{exit}' | tac | sed 's/^/  /'
cat <<MSG

[demo] vmfabric is still running (pid $(cat "$RUN/vmfabric.pid")), API on $SOCK.
  inspect:   $BIN network ls --socket $SOCK   (also: port ls default, lease ls default, stats)
  counters:  kill -USR1 $(cat "$RUN/vmfabric.pid"); tail $RUN/vmfabric.log
  stop it:   kill $(cat "$RUN/vmfabric.pid")
MSG
