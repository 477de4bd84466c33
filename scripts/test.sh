#!/usr/bin/env bash
# scripts/test.sh — every check and test vmfabric has: formatting, clippy, unit and
# integration tests over real sockets, TAP devices in network namespaces (root) and
# real QEMU guests (TCG), the Debian package installed and started, schemathesis
# against the API's OpenAPI document, and a short run of every fuzz target. Installs what it needs
# first. Run as root to run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One full build gains little from incremental artifacts but their disk (CI once ran out
# of space linking); the space left is printed so a link that fails for want of it says so.
export CARGO_INCREMENTAL=0
df -h . | sed 's/^/[test] disk: /'
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
guest/build.sh target/guest
# The Debian disk guest takes minutes to build (mmdebstrap, as root): in the background
# while the code compiles, cached outside the clone while its script is unchanged.
DEBIAN_GUEST=${VMFABRIC_DEBIAN_GUEST_DIR:-/var/cache/vmfabric/debian-guest}
debian_build=
if [ "$(id -u)" = 0 ]; then
    mkdir -p target
    guest/build-debian.sh "$DEBIAN_GUEST" > target/debian-guest.log 2>&1 &
    debian_build=$!
fi
# virtiofsd serves VMs' shares over virtio-fs (else QEMU's 9p does); Debian 12 does not
# package it, so it is built from crates.io, also in the background.
virtiofsd_build=
if ! command -v virtiofsd >/dev/null 2>&1; then
    mkdir -p target
    cargo install --locked --quiet virtiofsd@1.14.0 > target/virtiofsd-build.log 2>&1 &
    virtiofsd_build=$!
fi
step() { echo "[test] $(date +%T) $*"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# As root every test must run: a test that would skip (no QEMU, no TAP) fails instead.
if [ "$(id -u)" = 0 ]; then export VMFABRIC_REQUIRE_ALL_TESTS=1; fi
# A gateway thread's call off its allowlist kills the daemon here (refused with ENOSYS
# in production): a path that needs an unlisted call fails its test.
export VMFABRIC_SECCOMP=kill
if [ -n "$debian_build" ] && ! wait "$debian_build"; then
    cat target/debian-guest.log >&2
    echo "[test] the Debian guest did not build" >&2
    exit 1
fi
export VMFABRIC_DEBIAN_GUEST_DIR=$DEBIAN_GUEST
if [ -n "$virtiofsd_build" ] && ! wait "$virtiofsd_build"; then
    cat target/virtiofsd-build.log >&2
    echo "[test] virtiofsd did not build" >&2
    exit 1
fi
# Tests keep their scratch files under the temp directory and leave them there (a
# failing test's files say what happened; a full run left 90 directories, 256 MB, in
# /tmp): this run's temp directory is its own, removed when the run passes and named
# when it fails. Open to all like /tmp: a test's daemon may run as nobody.
SCRATCH=$(mktemp -d /tmp/vmf-test.XXXXXX)
chmod 1777 "$SCRATCH"
export TMPDIR=$SCRATCH
trap 'rc=$?; if [ "$rc" = 0 ]; then rm -rf --one-file-system "$SCRATCH"; else echo "[test] scratch files kept in $SCRATCH" >&2; fi' EXIT
step "cargo test"
VMFABRIC_GUEST_DIR=$PWD/target/guest cargo test --workspace --no-fail-fast
# The fuzz targets take ~11 minutes to build (every crate again, under the sanitizer, in
# their own target directory): built beside the package and API checks, which leave the
# cores mostly idle. (Built beside the tests instead, at the lowest priority, it got
# little CPU from the guests' emulation and slowed the tests by 9 %: no gain, measured.)
FUZZ_BUILD_ONLY=1 nice -n 10 scripts/fuzz.sh > target/fuzz-build.log 2>&1 &
fuzz_build=$!
# The Debian package, installed, started as systemd would, and purged.
step "package"
scripts/test-package.sh
# The HTTP API against its own OpenAPI document (schemathesis).
step "api fuzz"
# 6 examples per operation: CI's time limit. This step ends when the fuzz build beside
# it does (12 minutes of it in CI), so fewer examples save less than they seem: 10 took
# the step 13 minutes, 6 took it 10.5. Run api-fuzz.sh alone for more.
scripts/api-fuzz.sh "${API_FUZZ_EXAMPLES:-6}"
# Every fuzz target, briefly: past crashes replayed, then the corpus and new inputs.
if ! wait "$fuzz_build"; then
    cat target/fuzz-build.log >&2
    echo "[test] the fuzz targets did not build" >&2
    exit 1
fi
step "fuzz"
FUZZ_SECS=${FUZZ_SECS:-20} scripts/fuzz.sh
step "done"
