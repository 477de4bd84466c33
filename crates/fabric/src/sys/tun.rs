//! TUN/TAP devices: the `TUNSET*` ioctls, which have no safe wrapper and no netlink
//! equivalent (the kernel's tun driver refuses RTM_NEWLINK). The switch opens TAPs it
//! reads; hostnet makes persistent ones for kernel-mode ports. Both go through [`Tun`],
//! the one place that knows `struct ifreq` (libc's, per architecture).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

/// How to open a TAP device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOptions {
    /// Reads and writes do not block (the switch's event loop).
    pub nonblocking: bool,
    /// One queue of several (the VMM opens the device with as many).
    pub multi_queue: bool,
    /// Frames carry a virtio-net header.
    pub vnet_hdr: bool,
}

/// An fd attached to a TAP device (made if missing); the device goes with the last fd
/// unless made persistent.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

/// Checks an interface name for the kernel: 1 to 15 bytes, none of '/', ':', '%',
/// whitespace or NUL (with '%' the kernel would pick a name of its own).
pub fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: 1 to 15 characters, none of '/', ':', '%' or space"),
        ))
    }
}

impl Tun {
    /// Opens `/dev/net/tun` and attaches it to the TAP device `name`, without the
    /// packet-information header.
    pub fn open(name: &str, opts: TunOptions) -> io::Result<Tun> {
        check_name(name)?;
        let mut oflags = OFlags::RDWR | OFlags::CLOEXEC;
        if opts.nonblocking {
            oflags |= OFlags::NONBLOCK;
        }
        let fd = rustix::fs::open("/dev/net/tun", oflags, Mode::empty())?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if opts.multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        if opts.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        // SAFETY: ifreq is plain data (a name and a union of integers, addresses and a
        // pointer); all zeroes is a valid value of it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is (libc's
        // layout for this architecture) and which lives across the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = req.ifr_name.iter().position(|b| *b == 0).unwrap_or(libc::IFNAMSIZ);
        let given: Vec<u8> = req.ifr_name[..end].iter().map(|b| *b as u8).collect();
        Ok(Tun {
            fd,
            name: String::from_utf8_lossy(&given).into_owned(),
        })
    }

    /// The device's name as the kernel holds it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the device after the last fd closes (or not).
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        self.int_ioctl(libc::TUNSETPERSIST, on.into())
    }

    /// Lets the user `uid` open the device.
    pub fn set_owner(&self, uid: u32) -> io::Result<()> {
        self.int_ioctl(libc::TUNSETOWNER, uid.into())
    }

    /// Lets the group `gid` open the device.
    pub fn set_group(&self, gid: u32) -> io::Result<()> {
        self.int_ioctl(libc::TUNSETGROUP, gid.into())
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn int_ioctl(&self, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
        // SAFETY: the TUNSET{PERSIST,OWNER,GROUP} requests take an integer argument by
        // value; no memory is passed.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, value) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The offloads the switch takes from a TAP: checksums and TCP segmentation (ECN too),
/// which is what the software fallback in `crate::offload` can undo.
pub const SWITCH_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

/// How a TAP fd handed over by someone else frames its packets: the size of its
/// virtio-net header, or `None` when it has none.
pub fn vnet_hdr_len(fd: BorrowedFd<'_>) -> io::Result<Option<usize>> {
    // SAFETY: as in `Tun::open`, all zeroes is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes a struct ifreq into `req`, which lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags } as libc::c_int;
    if flags & libc::IFF_VNET_HDR == 0 {
        return Ok(None);
    }
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int into `len`, which lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut len as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(len as usize))
}

/// Asks the kernel for offloaded frames on a TAP fd that has a virtio-net header.
pub fn set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejects_bad_names_before_any_system_call() {
        for bad in ["", "a/b", "this-name-is-too-long", "a b", "cp%d", "a:b"] {
            let err = super::Tun::open(bad, Default::default()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
