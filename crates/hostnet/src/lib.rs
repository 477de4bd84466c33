//! vmfabric's kernel mode: the Linux kernel carries the frames. A network is a bridge
//! with the gateway's address; each port is a persistent TAP device on it, for a VMM
//! (Firecracker, Cloud Hypervisor) to open. This crate makes and finds those devices
//! (netlink through `rtnetlink`; only TAP creation needs an ioctl), derives stable
//! MACs, hands out addresses and writes vmfabric's nftables table (masquerade, port
//! forwards, isolation); it knows nothing of the gateway or the daemon.
//!
//! Devices vmfabric makes carry an interface alias starting with [`ALIAS_PREFIX`], so
//! they are recognised after a crash and never confused with anybody else's.
#![forbid(unsafe_code)]

pub mod ipam;
pub mod links;
pub mod mac;
pub mod nft;

pub use links::{Links, OwnedLink, TapOptions, VxlanOptions};

/// The `ifalias` prefix of every device vmfabric creates.
pub const ALIAS_PREFIX: &str = "vmfabric:";

#[derive(Debug, thiserror::Error)]
pub enum HostnetError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("nftables: {0}")]
    Nft(String),
    #[error("{name} exists and was not created by vmfabric")]
    Foreign { name: String },
}
