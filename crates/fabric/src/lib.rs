//! vmfabric's data plane: an L2 learning switch that VMMs plug into.
//!
//! A [`Switch`] holds many [`NetworkConfig`]-shaped networks, each an isolated broadcast
//! domain with its own MAC table. Ports reach VMs over socketpairs, bound datagram
//! paths, length-prefixed stream paths and TAP devices. The data plane knows nothing of
//! HTTP, storage or QEMU: it takes commands through [`Switch`] methods and reports
//! [`SwitchEvent`]s and counters.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod config;
pub mod counters;
pub mod error;
pub mod frame;
pub mod guard;
pub mod mac;
pub mod offload;
pub mod port;
mod ring;
mod switch;
mod sys;
mod transport;
mod vhost_user;
pub mod vxlan;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use config::{NetworkConfig, SwitchConfig, DEFAULT_MTU, MAX_MTU};
pub use counters::{CounterSnapshot, DropReason};
pub use error::{FabricError, Result};
pub use mac::Mac;
pub use port::{Capture, CapturedFrame, MacEntry, PortId, PortInfo, PortLock, SwitchEvent, TapSource, Transport};
pub use ring::{Full, InProcessEnd};
pub use switch::Switch;
pub use vhost_user::device::MAX_QUEUE_PAIRS as VHOST_USER_MAX_QUEUE_PAIRS;

/// Sends frames on a connected datagram socket (a port's far end) in one syscall,
/// without blocking; returns how many the kernel took (`Err` only when none was sent).
pub fn send_frames(fd: std::os::fd::BorrowedFd<'_>, frames: &[&[u8]]) -> std::io::Result<usize> {
    sys::mmsg::send_batch(fd, frames, None)
}

pub use sys::keep_large_allocations_mapped;
pub use sys::tun::{check_name as check_ifname, Tun, TunOptions};

/// Opens (creating if needed) the TAP device `name` as `IFF_TAP|IFF_NO_PI`,
/// non-blocking; returns the fd and the device's name.
pub fn open_tap(name: &str) -> std::io::Result<(std::os::fd::OwnedFd, String)> {
    let tun = Tun::open(
        name,
        TunOptions {
            nonblocking: true,
            ..Default::default()
        },
    )?;
    let name = tun.name().to_string();
    Ok((tun.into_fd(), name))
}
