//! What the TCP splice needs that safe wrappers do not give: the peek offset of a TCP
//! socket, the bytes in its send queue, and a socket in Tokio's reactor. The only
//! unsafe code in the gateway.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Sets where the next `MSG_PEEK` starts, in bytes from the first unread one; consuming
/// reads move it back by what they take. Linux 6.9 and later do this for TCP; older
/// kernels answer an error and the caller peeks from the start.
pub(crate) fn set_peek_offset(fd: impl AsFd, offset: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain setsockopt on a descriptor we borrow, with a pointer to an int that
    // lives across the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet (SIOCOUTQ).
pub(crate) fn unacked_send_bytes(fd: impl AsFd) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at ours.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut value as *mut libc::c_int) };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers a socket with Tokio's reactor for readiness waits.
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: register asks that the descriptor stay open while registered; the AsyncFd
    // owns it, so it closes only after the registration is gone.
    unsafe { Ok(tokio::io::unix::AsyncFd::register(fd)?) }
}
