//! Running VMs attached to vmfabric networks.
//!
//! This crate builds VMM command lines for guests whose NICs are vmfabric ports and
//! picks the acceleration that really works on the host.

pub mod accel;
pub mod qemu;

pub use accel::Accel;
pub use qemu::{Nic, NicBackend, QemuConfig, Serial};
