#!/usr/bin/env bash
# scripts/seccomp-learn.sh — prints the system calls the gateway threads made that
# their allowlist (crates/vmfabric/src/control/sandbox/calls.rs) lacks. Root: runs the
# daemon's tests with the filter in its logging mode (VMFABRIC_SECCOMP=log: an unlisted
# call is allowed and the kernel logs it) and reads the kernel log.
#   scripts/seccomp-learn.sh [cargo test arguments, default: -p vmfabric]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "seccomp-learn: needs root (capabilities to drop, the kernel log)" >&2; exit 1; }
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
# The kernel rate-limits its log to 10 lines in 5 s; every logged call counts here.
ratelimit=$(cat /proc/sys/kernel/printk_ratelimit)
console=$(cut -f1 /proc/sys/kernel/printk)
log=$(mktemp)
dmesg --follow-new >"$log" &
follower=$!
restore() { kill "$follower" 2>/dev/null || true; echo "$ratelimit" >/proc/sys/kernel/printk_ratelimit
    dmesg -n "$console"; rm -f "$log"; }
trap restore EXIT
echo 0 >/proc/sys/kernel/printk_ratelimit
# Logged calls stay off the console, which may be a slow serial line.
dmesg -n 1
[ $# -gt 0 ] || set -- -p vmfabric
VMFABRIC_SECCOMP=log VMFABRIC_REQUIRE_ALL_TESTS=1 VMFABRIC_GUEST_DIR=$PWD/target/guest \
    cargo test --no-fail-fast "$@" >&2 || echo "seccomp-learn: some tests failed; the list may be short" >&2
sleep 1
# syscall numbers -> names, from the kernel's own header.
names=$(awk '/^#define __NR_/ { sub("__NR_", "", $2); print $3, $2 }' /usr/include/x86_64-linux-gnu/asm/unistd_64.h)
listed=$(grep -o 'SYS_[a-z0-9_]*' crates/vmfabric/src/control/sandbox/calls.rs | sed 's/^SYS_//' | sort -u)
grep 'comm="vmf-gateway"' "$log" | grep -o ' syscall=[0-9]*' | cut -d= -f2 | sort -n | uniq -c |
    while read -r count nr; do
        name=$(awk -v nr="$nr" '$1 == nr { print $2 }' <<<"$names")
        if grep -qx "$name" <<<"$listed"; then
            echo "listed, arguments outside its rule: $name ($nr), $count calls"
        else
            echo "unlisted: $name ($nr), $count calls"
        fi
    done
