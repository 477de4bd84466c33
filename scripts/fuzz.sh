#!/usr/bin/env bash
# scripts/fuzz.sh — builds the cargo-fuzz targets in fuzz/ and runs each one: first
# every past crash in fuzz/regressions/TARGET (each must now pass), then the checked-in
# corpus and new inputs for FUZZ_SECS seconds (default 20) per target. Runs on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets it take libFuzzer's flags). FUZZ_BUILD_ONLY=1
# builds and stops (the test script builds ahead, beside its package and API checks). New corpus
# entries go to a scratch directory, never into the checkout; a crash is copied to
# fuzz/artifacts/ and fails the run. Usage: scripts/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECS:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "[fuzz] installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2 >/dev/null
fi
command -v c++ >/dev/null || { echo "[fuzz] a C++ compiler is needed for libFuzzer (apt-get install g++)" >&2; exit 1; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
echo "[fuzz] building ${#targets[@]} targets (debug assertions on)"
cargo fuzz build -a >/dev/null 2>&1 || cargo fuzz build -a
[ -z "${FUZZ_BUILD_ONLY:-}" ] || exit 0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
total=0
for t in "${targets[@]}"; do
    if compgen -G "fuzz/regressions/$t/*" >/dev/null; then
        cargo fuzz run -a "$t" fuzz/regressions/"$t"/* -- -runs=1 >/dev/null 2>&1 \
            || { echo "[fuzz] $t: a past crash crashes again" >&2; cargo fuzz run -a "$t" fuzz/regressions/"$t"/* -- -runs=1; exit 1; }
    fi
    mkdir -p "$scratch/$t"
    log="$scratch/$t.log"
    if ! cargo fuzz run -a "$t" "$scratch/$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "[fuzz] $t: crashed (input in fuzz/artifacts/$t)" >&2
        exit 1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo 0)
    total=$((total + runs))
    echo "[fuzz] $t: $runs runs in ${secs}s, 0 crashes, corpus $(ls "fuzz/corpus/$t" | wc -l) seeds + $(ls "$scratch/$t" | wc -l) new"
done
echo "[fuzz] $total runs in all"
echo "fuzz: ${#targets[@]} passed, 0 failed"
