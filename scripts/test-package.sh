#!/usr/bin/env bash
# scripts/test-package.sh — the Debian package as a user meets it: built, installed with
# dpkg -i on this machine, its files checked (binary, units, config, completions, man
# pages, docs, group vmfabric, the socket enabled), the service started the way systemd
# starts it (the unit's ExecStart under socket activation, readiness over
# NOTIFY_SOCKET), the CLI used by a member of group vmfabric, then purged and checked
# gone. Needs root. Its daemon keeps its state and ports in a scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[package-test] $*"; }
fail() { echo "[package-test] FAIL: $*" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
    [ "${VMFABRIC_REQUIRE_ALL_TESTS:-}" = 1 ] && fail "must run here, but needs root"
    say "SKIP: needs root (dpkg -i)"
    exit 0
fi
if dpkg-query -W -f='${Status}' vmfabric 2>/dev/null | grep -q 'ok installed'; then
    fail "a vmfabric package is installed already; this test will not replace it"
fi
# The debug build the tests made already (cargo-deb 3.6 warns that dev builds are not
# for releases: this one is for the test only).
PROFILE=dev scripts/package.sh >/dev/null 2>&1 || PROFILE=dev scripts/package.sh
deb=$(ls -t target/debian/vmfabric_*.deb | head -n 1)
work=$(mktemp -d /tmp/vmf-pkg.XXXXXX)
chmod 755 "$work" # the group's member must reach the socket in it
user=vmfpkg$$
cleanup() {
    [ -n "${activator:-}" ] && kill "$activator" 2>/dev/null && wait "$activator" 2>/dev/null || true
    [ -n "${listener:-}" ] && kill "$listener" 2>/dev/null || true
    userdel "$user" 2>/dev/null || true
    dpkg --purge vmfabric >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
say "dpkg -i $deb"
dpkg -i "$deb" >/dev/null
for f in /usr/bin/vmfabric /lib/systemd/system/vmfabric.service /lib/systemd/system/vmfabric.socket \
    /etc/vmfabric/vmfabric.toml /usr/share/bash-completion/completions/vmfabric \
    /usr/share/zsh/vendor-completions/_vmfabric /usr/share/fish/vendor_completions.d/vmfabric.fish \
    /usr/share/man/man1/vmfabric.1.gz /usr/share/man/man1/vmfabric-network-set.1.gz \
    /usr/share/doc/vmfabric/config.md; do
    [ -e "$f" ] || fail "$f is not installed"
done
getent group vmfabric >/dev/null || fail "group vmfabric was not made"
[ -L /etc/systemd/system/sockets.target.wants/vmfabric.socket ] || fail "vmfabric.socket is not enabled"
grep -q '^/etc/vmfabric/vmfabric.toml$' /var/lib/dpkg/info/vmfabric.conffiles || fail "the config is not a conffile"
bash -n /usr/share/bash-completion/completions/vmfabric || fail "the bash completions do not parse"
gzip -t /usr/share/man/man1/vmfabric.1.gz
verify=$(systemd-analyze verify /lib/systemd/system/vmfabric.socket /lib/systemd/system/vmfabric.service 2>&1 || true)
# Documentation= names man pages; anything else systemd-analyze says is a fault.
if echo "$verify" | grep -v "Command 'man " | grep -q .; then
    fail "systemd-analyze verify: $verify"
fi
# Start it as systemd would: the socket unit's socket, group and mode; the service
# unit's ExecStart with LISTEN_FDS and NOTIFY_SOCKET.
exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/vmfabric.service)
mode=$(sed -n 's/^SocketMode=//p' /lib/systemd/system/vmfabric.socket)
group=$(sed -n 's/^SocketGroup=//p' /lib/systemd/system/vmfabric.socket)
sock=$work/vmfabric.sock
socat -u UNIX-RECV:"$work/notify.sock" OPEN:"$work/notify.txt",creat,append &
listener=$!
# shellcheck disable=SC2086 # ExecStart is a command line
systemd-socket-activate -l "$sock" -E NOTIFY_SOCKET="$work/notify.sock" \
    -E VMFABRIC_STATE_DIR="$work/state" -E VMFABRIC_RUN_DIR="$work/run" \
    $exec_start 2>"$work/daemon.log" &
activator=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
chgrp "$group" "$sock"
chmod "$mode" "$sock"
useradd --system --no-create-home --groups vmfabric "$user"
out=$(runuser -u "$user" -- vmfabric network ls --socket "$sock") || fail "a member of group vmfabric cannot use the CLI"
echo "$out" | grep -q '^default ' || fail "network ls: $out"
for _ in $(seq 50); do grep -q READY=1 "$work/notify.txt" 2>/dev/null && break; sleep 0.1; done
grep -q READY=1 "$work/notify.txt" || fail "the service never said READY=1"
grep -q '"level":"INFO"' "$work/daemon.log" || fail "the service does not log JSON: $(head -n 3 "$work/daemon.log")"
kill -TERM "$activator"
wait "$activator" || fail "the service did not stop cleanly: $(tail -n 5 "$work/daemon.log")"
activator=
say "dpkg --purge vmfabric"
dpkg --purge vmfabric >/dev/null
[ ! -e /usr/bin/vmfabric ] && [ ! -e /etc/vmfabric/vmfabric.toml ] || fail "files left after purge"
getent group vmfabric >/dev/null && fail "group vmfabric left after purge"
say "ok: installed, started by socket activation, ready, used by group vmfabric, purged"
