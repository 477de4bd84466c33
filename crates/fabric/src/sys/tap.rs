//! TUN/TAP device creation: the one ioctl (`TUNSETIFF`) that has no safe wrapper.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags of the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to the TAP device `name` (created if missing),
/// non-blocking, without the packet-information header. Returns the fd and the name the
/// kernel gave (a `%d` in `name` is filled in).
pub fn open_tap(name: &str) -> io::Result<(OwnedFd, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: 1 to 15 characters, no '/', space or NUL"),
        ));
    }
    let fd = rustix::fs::open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes); IfReqFlags has that
    // size and the same layout for the name and flags members, and lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = req.name.iter().position(|b| *b == 0).unwrap_or(libc::IFNAMSIZ);
    Ok((fd, String::from_utf8_lossy(&req.name[..end]).into_owned()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_has_kernel_size() {
        assert_eq!(std::mem::size_of::<super::IfReqFlags>(), 40);
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "this-name-is-too-long", "a b"] {
            assert_eq!(
                super::open_tap(bad).unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput
            );
        }
    }
}
