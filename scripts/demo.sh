#!/usr/bin/env bash
# scripts/demo.sh — vmfabric's main job on this machine: the switch serving network
# "default", with two real QEMU guests on it. One guest serves HTTP on a unixgram port;
# the other, on a stream port, pings it and fetches its page. vmfabric keeps running
# afterwards, with the commands to inspect and stop it.
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

echo "[demo] booting guest 'web' (10.77.0.11, HTTP server) on the unixgram port"
setsid "$BIN" boot-guest --guest-dir target/guest --dgram "$RUN/ports/web.sock" \
    --ip 10.77.0.11/24 --hostname web --http > "$RUN/web.console" 2>&1 < /dev/null &
WEB=$!
echo "[demo] booting guest 'client' (10.77.0.12) on the stream port: ping web, fetch its page"
"$BIN" boot-guest --guest-dir target/guest --stream "$RUN/ports/client.stream" \
    --ip 10.77.0.12/24 --hostname client \
    --cmd 'for i in $(seq 30); do ping -c1 -W1 10.77.0.11 >/dev/null && break; done; ping -c 3 10.77.0.11 && wget -qO- http://10.77.0.11/' \
    2>&1 | grep -E '^(VMFABRIC|PING|64 bytes|[0-9]+ packets|round-trip|hello)' | sed 's/^/  client| /'
kill "$WEB" 2>/dev/null || true
wait "$WEB" 2>/dev/null || true
echo "  web| $(grep -a VMFABRIC_READY "$RUN/web.console" || echo 'no readiness marker')"

kill -USR1 "$(cat "$RUN/vmfabric.pid")"; sleep 0.3
echo "[demo] vmfabric's counters for the two ports:"
tac "$RUN/vmfabric.log" | awk '/^MAC table/{p=1} p{print} /^port +rx_frames/{exit}' | tac | sed 's/^/  /'
cat <<MSG

[demo] vmfabric is still running (pid $(cat "$RUN/vmfabric.pid")), serving $RUN/ports/*.
  counters:  kill -USR1 $(cat "$RUN/vmfabric.pid"); tail $RUN/vmfabric.log
  stop it:   kill $(cat "$RUN/vmfabric.pid")
MSG
