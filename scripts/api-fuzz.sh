#!/usr/bin/env bash
# scripts/api-fuzz.sh — property-based fuzzing of the daemon's HTTP API with
# schemathesis (PyPI), driven by the OpenAPI document the daemon serves. The daemon
# runs as root inside a network namespace of its own (so kernel-mode networks the
# fuzzer asks for make devices and firewall tables only there), and socat bridges a
# loopback TCP port to its Unix socket (schemathesis speaks TCP only). Fails on any 5xx
# answer, an undocumented status or content type, or an answer that does not match its
# schema. Not checked: that every schema-valid request is accepted (many refusals are
# semantic: overlapping subnets, options of the other mode).
# Usage: scripts/api-fuzz.sh [MAX_EXAMPLES per operation, default 25]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
examples=${1:-25}
[ "$(id -u)" = 0 ] || { echo "[api-fuzz] needs root (a network namespace for the daemon); skipped" >&2; exit 0; }
venv=$PWD/target/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "[api-fuzz] installing schemathesis into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q schemathesis==4.32.5
fi
cargo build -q --bin vmfabric
work=$(mktemp -d /tmp/vmf-apifuzz.XXXXXX)
ns=vmf-apifuzz-$$
port=$((20000 + $$ % 20000))
cleanup() {
    [ -n "${bridge:-}" ] && kill "$bridge" 2>/dev/null || true
    [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" target/debug/vmfabric serve --socket "$work/api.sock" --state-dir "$work/state" \
    --run-dir "$work/run" >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -S "$work/api.sock" ] && break; sleep 0.1; done
socat TCP-LISTEN:"$port",bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:"$work/api.sock" &
bridge=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v1/networks" >/dev/null && break; sleep 0.1; done
echo "[api-fuzz] schemathesis, $examples examples per operation"
# Left out: the pcap and event streams (they never end), the socketpair upgrade (it hands over an
# fd, not an HTTP answer) and running VMs (each would boot QEMU).
# From the scratch directory: schemathesis keeps a cache where it runs.
if ! (cd "$work" && "$venv/bin/schemathesis" run "http://127.0.0.1:$port/v1/openapi.json" \
    --max-examples "$examples" --workers 1 --seed 1 --no-color --request-timeout 20 \
    --exclude-operation-id capture --exclude-operation-id events --exclude-operation-id socketpair --exclude-operation-id run_vm \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    >"$work/report.txt" 2>&1); then
    cat "$work/report.txt" >&2
    echo "[api-fuzz] the daemon's log:" >&2
    tail -n 40 "$work/daemon.log" >&2
    exit 1
fi
grep -E "generated|passed|Test cases" "$work/report.txt" | tail -n 3
kill -0 "$daemon" || { echo "[api-fuzz] the daemon died" >&2; exit 1; }
echo "[api-fuzz] ok"
