# scripts/bench-lib.sh — what the bench-*.sh scripts share; sourced, not run.

# The vmfabric binary to measure: VMFABRIC_BIN (another build, for a before/after), or
# this tree's release build.
bench_binary() {
    if [ -n "${VMFABRIC_BIN:-}" ]; then
        BIN=$VMFABRIC_BIN
    else
        cargo build --release -q -p vmfabric
        BIN=$PWD/target/release/vmfabric
    fi
}

# Starts the daemon with its state under $WORK (API socket $VMFABRIC_SOCKET); sets DAEMON.
start_daemon() {
    "$BIN" serve --state-dir "$WORK/state" --run-dir "$WORK/run" >"$WORK/daemon.log" 2>&1 &
    DAEMON=$!
    for _ in $(seq 100); do [ -S "$VMFABRIC_SOCKET" ] && break; sleep 0.1; done
}

# What every benchmark starts with: RUNS and SECS defaulted, root checked, the Debian
# packages named installed, BIN built, a scratch directory in WORK.
bench_start() {
    RUNS=${RUNS:-3}
    SECS=${SECS:-10}
    [ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
    need_packages "$@"
    bench_binary
    WORK=$(mktemp -d)
}

# Installs Debian packages that are missing.
need_packages() {
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null
    done
}

# A process's user+system CPU time so far, in clock ticks (HZ per second).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# The whole machine's busy CPU time so far (user, nice, system, irq, softirq, steal),
# in clock ticks summed over its processors.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# The median of whitespace-separated numbers on stdin.
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# ADDRESS:PORT, with an IPv6 address in brackets.
hostport() { if [[ $1 == *:* ]]; then echo "[$1]:$2"; else echo "$1:$2"; fi; }
