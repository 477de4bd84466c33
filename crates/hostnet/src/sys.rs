//! Persistent TAP devices: the TUNSETIFF/TUNSETPERSIST/TUNSETOWNER ioctls, which have no
//! safe wrapper and no netlink equivalent (the kernel's tun driver refuses RTM_NEWLINK).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags of the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ioctl_int(fd: &OwnedFd, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the TUNSET{PERSIST,OWNER,GROUP} requests take an integer argument by
    // value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, value) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the TAP device `name` if it does not exist (an existing one is reused) and
/// makes it persistent, owned by `owner` (uid, gid) when given, so an unprivileged VMM
/// can open it. The fd used to set it up is closed on return.
pub fn make_persistent_tap(name: &str, owner: Option<(u32, u32)>, multi_queue: bool, vnet_hdr: bool) -> io::Result<()> {
    let fd = rustix::fs::open("/dev/net/tun", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let mut flags = IFF_TAP | IFF_NO_PI;
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes); IfReqFlags has that
    // size and the same layout for the name and flags members, and lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some((uid, gid)) = owner {
        ioctl_int(&fd, TUNSETOWNER, uid.into())?;
        ioctl_int(&fd, TUNSETGROUP, gid.into())?;
    }
    ioctl_int(&fd, TUNSETPERSIST, 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_has_kernel_size() {
        assert_eq!(std::mem::size_of::<super::IfReqFlags>(), 40);
    }
}
