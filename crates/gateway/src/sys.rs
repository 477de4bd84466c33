//! What the TCP splice needs that safe wrappers do not give: the peek offset of a TCP
//! socket, the room in its send buffer, and a socket in Tokio's reactor. The only
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

/// The room left in a socket's send buffer, in the kernel's own accounting: the buffer
/// size less the memory its queued data takes, headers and all (SO_MEMINFO). A TCP
/// write of up to this much succeeds at once; the bytes in flight (SIOCOUTQ) leave out
/// that overhead and a window from them promised more than the socket took.
pub(crate) fn send_buffer_room(fd: impl AsFd) -> io::Result<usize> {
    // The kernel's SK_MEMINFO_VARS (libc does not name it); a shorter answer leaves
    // zeros, and an older kernel's fields keep their places.
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that long and
    // lives across the call, and stores the length it wrote into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let size = info[libc::SK_MEMINFO_SNDBUF as usize];
    let queued = info[libc::SK_MEMINFO_WMEM_QUEUED as usize];
    Ok(size.saturating_sub(queued) as usize)
}

/// Registers a socket with Tokio's reactor for readiness waits.
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: register asks that the descriptor stay open while registered; the AsyncFd
    // owns it, so it closes only after the registration is gone.
    unsafe { Ok(tokio::io::unix::AsyncFd::register(fd)?) }
}
