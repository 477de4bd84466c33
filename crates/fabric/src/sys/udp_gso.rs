//! UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18) and receive coalescing
//! (`UDP_GRO`, Linux 5.0) for the VXLAN underlay: a run of equal-sized datagrams to one
//! address is one `sendmsg` and one packet through the stack, cut into datagrams only
//! at the end (by the NIC, the kernel, or never, when a veth hands it to a socket that
//! coalesces); on receipt, a run from one sender comes up as one buffer with the size
//! it is cut at. Neither std nor rustix offers these control messages.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most datagrams one segmented send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes one segmented send may carry: an IPv4 datagram's largest payload.
pub const MAX_BYTES: usize = 65_507;

/// Asks the kernel to hand this UDP socket runs of datagrams as one buffer.
pub fn enable_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, a live local; the
    // fd is borrowed, so open for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Room for one control message carrying an int (UDP_GRO) or a u16 (UDP_SEGMENT),
/// aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct ControlRoom([u8; 64]);

/// Sends `parts` (gathered, in order) to `to` as datagrams of `segment` bytes each, the
/// last possibly shorter: one system call and one packet through the stack. The caller
/// keeps to [`MAX_SEGMENTS`] and [`MAX_BYTES`].
pub fn send_segments(fd: BorrowedFd<'_>, to: SocketAddr, parts: &[IoSlice<'_>], segment: u16) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(to);
    let mut control = ControlRoom([0; 64]);
    // SAFETY: msghdr is plain old data; all-zero is valid (no name, no data, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    // IoSlice is ABI-compatible with iovec on Unix; the kernel only reads through it.
    msg.msg_iov = parts.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = parts.len();
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which is aligned for cmsghdr and larger
    // than CMSG_SPACE(2), so the first header and its 2 data bytes lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    // SAFETY: every pointer in `msg` (address, iovecs, control) refers to memory that
    // lives until the call returns, with the lengths given; the kernel only reads it.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Receives into `buf`: how many bytes, from whom, and the size the bytes are cut into
/// datagrams at when the kernel coalesced several (`None`: one datagram).
pub fn recv_coalesced(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    let mut from = socket2::SockAddrStorage::zeroed();
    let mut control = ControlRoom([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut socket2::SockAddrStorage).cast();
    msg.msg_namelen = from.size_of();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    // SAFETY: the name, the one iovec (over `buf`) and the control room are live and
    // writable for their lengths until the call returns.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut segment = None;
    // SAFETY: the kernel set msg_controllen to what it wrote into `control`; the CMSG
    // macros walk only within it, and an int's worth of data follows a UDP_GRO header.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                segment = usize::try_from(size).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // SAFETY: the kernel wrote a socket address of msg_namelen bytes into `from`.
    let addr = unsafe { socket2::SockAddr::new(from, msg.msg_namelen) };
    let from = addr
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a datagram from no IP address"))?;
    Ok((n as usize, from, segment))
}
