#!/usr/bin/env bash
# scripts/package.sh — the Debian package, target/debian/vmfabric_<version>-1_amd64.deb:
# the binary, systemd units (socket activation), /etc/vmfabric/vmfabric.toml, shell
# completions and man pages generated from the CLI, and the docs. PROFILE=dev packages
# the debug build (what the package test uses); the default is release.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "[package] installing cargo-deb"
    cargo install --locked cargo-deb --version 3.6.0
fi
profile=${PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --profile "$profile" -p vmfabric --bin vmfabric
bin=target/$dir/vmfabric
rm -rf target/assets
mkdir -p target/assets/completions target/assets/man
"$bin" completions bash >target/assets/completions/vmfabric.bash
"$bin" completions zsh >target/assets/completions/_vmfabric
"$bin" completions fish >target/assets/completions/vmfabric.fish
"$bin" man target/assets/man
gzip -9n target/assets/man/*.1
cargo deb -p vmfabric --no-build --profile "$profile" "$@"
