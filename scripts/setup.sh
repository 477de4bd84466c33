#!/usr/bin/env bash
# scripts/setup.sh — installs what building, running and testing vmfabric needs on
# Debian 12: QEMU (guests), busybox-static (guest userland, ping in tests), iproute2
# (namespaces in tests), isc-dhcp-client, bind9-dnsutils and dnsmasq-base (real DHCP
# and DNS clients, and a loopback upstream, in the gateway tests), nftables (kernel-mode
# NAT rules), g++ (libFuzzer, for the fuzz targets), python3-venv, socat and curl (the
# API fuzzing with schemathesis), python3-prometheus-client (its OpenMetrics parser
# checks the metrics page) and promtool (so does it, in the Prometheus text format:
# taken from Debian's prometheus package, without the server), systemd, adduser and
# passwd (the package test: socket activation, systemd-analyze, the vmfabric group and a
# member of it), mmdebstrap and openssh-client (the Debian disk guest: built from
# Debian's packages, reached over SSH), libseccomp-dev and libcap-ng-dev (virtiofsd,
# built from crates.io by scripts/test.sh), ethtool (the VXLAN test turns off a kernel
# vxlan device's checksum offload), protobuf-compiler and libprotobuf-dev (the etcd
# client's gRPC code is generated at build time) and etcd-server (the cluster tests
# start their own member on loopback). Rust comes from rustup; this script checks it is there.
set -euo pipefail
need=(qemu-system-x86 qemu-utils busybox-static iproute2 ca-certificates isc-dhcp-client bind9-dnsutils dnsmasq-base tshark nftables g++ python3-venv socat curl python3-prometheus-client systemd adduser passwd mmdebstrap openssh-client libseccomp-dev libcap-ng-dev ethtool protobuf-compiler libprotobuf-dev etcd-server openssl)
missing=()
for p in "${need[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A machine may carry a newer qemu-utils than Debian 12's (from backports): installing
# Debian's qemu-system-x86 then removes it, and with it qemu-img. Debian's own goes back in.
if ! command -v qemu-img >/dev/null 2>&1; then
    echo "[setup] installing qemu-utils (qemu-img) to match qemu-system-x86"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
    echo "[setup] installing promtool (from Debian's prometheus package)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null; })
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    $SUDO install -m 755 "$tmp/x/usr/bin/promtool" /usr/local/bin/promtool
    rm -rf "$tmp"
fi
if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "[setup] Rust is missing: install it with rustup (https://rustup.rs), then run this again." >&2
    exit 1
fi
# clippy and rustfmt ship with rustup's default profile; add them if a minimal one is in use.
if command -v rustup >/dev/null 2>&1; then
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
fi
echo "[setup] ok: $(cargo --version), $(qemu-system-x86_64 --version | head -n1), $(qemu-img --version | head -n1)"
