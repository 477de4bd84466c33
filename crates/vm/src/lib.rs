//! Running VMs attached to vmfabric networks.
//!
//! `config` says what a VM is and checks it; `qemu` turns it into a QEMU command line
//! (one NIC per vmfabric port; disks, shares, vsock); `storage` and `cloud_init`
//! make what a boot attaches (overlays, the NoCloud seed); `driver` runs and supervises the process through its
//! lifecycle; `readiness` and `process` are the two facts the driver must not get
//! wrong: when the guest is really ready, and which process is really the VMM.
#![forbid(unsafe_code)]

pub mod accel;
pub mod cloud_init;
pub mod config;
pub mod driver;
pub mod guest;
pub mod process;
pub mod qemu;
pub mod readiness;
pub mod storage;

pub use accel::Accel;
pub use cloud_init::CloudInit;
pub use config::{VmConfig, VmConfigError};
pub use driver::{QemuVm, VmState};
pub use guest::GuestCmdline;
pub use qemu::{Nic, NicBackend, QemuConfig, Serial};
pub use storage::{Disk, DiskFormat, DiskMode, Share};
