//! Batched datagram I/O on AF_UNIX sockets: one system call moves up to [`BATCH`] frames.
//!
//! The header arrays live on the stack and point into caller-owned buffers only for the
//! duration of the call, so nothing is allocated per call.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Frames moved per system call at most.
pub const BATCH: usize = 32;

/// A Unix socket address as the kernel reported it, kept to reply to the same peer.
#[derive(Clone, Copy)]
pub struct UnixPeer {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl UnixPeer {
    const FAMILY_LEN: usize = std::mem::size_of::<libc::sa_family_t>();

    pub fn empty() -> Self {
        UnixPeer {
            // SAFETY: sockaddr_un is plain old data; all-zero bytes are a valid value.
            addr: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        }
    }

    /// The address of a socket bound at `path` (a VMM's own datagram path, known
    /// before it sends anything).
    pub fn from_path(path: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        let mut peer = UnixPeer::empty();
        if bytes.is_empty() || bytes.len() >= peer.addr.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a usable socket path", path.display()),
            ));
        }
        peer.addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, src) in peer.addr.sun_path.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // Family, path and its terminating NUL (already zero).
        peer.len = (Self::FAMILY_LEN + bytes.len() + 1) as libc::socklen_t;
        Ok(peer)
    }

    /// The peer had bound a name (path or abstract), so it can be answered.
    pub fn is_named(&self) -> bool {
        self.len as usize > Self::FAMILY_LEN
    }

    fn name_bytes(&self) -> &[u8] {
        let n = (self.len as usize)
            .saturating_sub(Self::FAMILY_LEN)
            .min(self.addr.sun_path.len());
        // SAFETY: sun_path is an array of c_char (i8 or u8), which has the size and
        // alignment of u8; n is within the array.
        unsafe { std::slice::from_raw_parts(self.addr.sun_path.as_ptr().cast::<u8>(), n) }
    }

    /// Human-readable name: the path, or `@name` for the abstract namespace.
    pub fn display(&self) -> String {
        let b = self.name_bytes();
        match b.first() {
            None => "(unnamed)".to_string(),
            Some(0) => format!("@{}", String::from_utf8_lossy(&b[1..])),
            Some(_) => {
                let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
                String::from_utf8_lossy(&b[..end]).into_owned()
            }
        }
    }
}

impl Default for UnixPeer {
    fn default() -> Self {
        UnixPeer::empty()
    }
}

impl PartialEq for UnixPeer {
    fn eq(&self, other: &Self) -> bool {
        self.name_bytes() == other.name_bytes()
    }
}

impl std::fmt::Debug for UnixPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

/// What one received datagram turned out to be.
#[derive(Clone, Copy, Default, Debug)]
pub struct Received {
    /// Bytes written into the buffer.
    pub len: usize,
    /// The datagram was longer than the buffer: the kernel cut it (`MSG_TRUNC`).
    pub truncated: bool,
}

/// Receives up to `min(bufs.len(), BATCH)` datagrams without blocking, each into
/// `bufs[i][..max_len]`. With `peers`, also records each sender's address. Returns how
/// many arrived; `Ok(0)` when none was waiting.
pub fn recv_batch(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    max_len: usize,
    out: &mut [Received; BATCH],
    mut peers: Option<&mut [UnixPeer; BATCH]>,
) -> io::Result<usize> {
    let n = bufs.len().min(BATCH);
    let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    for i in 0..n {
        let buf = &mut bufs[i];
        let len = max_len.min(buf.len());
        iov[i].write(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        });
        // SAFETY: mmsghdr is plain old data; all-zero is valid (null name, no control).
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_iov = iov[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        if let Some(p) = peers.as_deref_mut() {
            p[i] = UnixPeer::empty();
            h.msg_hdr.msg_name = (&mut p[i].addr as *mut libc::sockaddr_un).cast();
            h.msg_hdr.msg_namelen = p[i].len;
        }
        hdrs[i].write(h);
    }
    // SAFETY: the first n headers are initialised; each points at one initialised iovec
    // over a live buffer of at least iov_len bytes and, when asked, at a live
    // sockaddr_un with its size in msg_namelen. All of them outlive the call. A null
    // timeout makes it return as soon as the (non-blocking) queue is drained.
    let got = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    let got = got as usize;
    for i in 0..got {
        // SAFETY: the kernel filled the first `got` headers; they were initialised above.
        let h = unsafe { hdrs[i].assume_init_ref() };
        out[i] = Received {
            len: h.msg_len as usize,
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
        if let Some(p) = peers.as_deref_mut() {
            p[i].len = h.msg_hdr.msg_namelen;
        }
    }
    Ok(got)
}

/// Sends up to `BATCH` frames without blocking, to `peer` when given (an unconnected
/// socket) or to the connected peer. Returns how many the kernel took: fewer than asked
/// means the next one would block or failed; `Err` only when none was sent.
pub fn send_batch(fd: BorrowedFd<'_>, frames: &[&[u8]], peer: Option<&UnixPeer>) -> io::Result<usize> {
    let n = frames.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let mut hdrs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    for i in 0..n {
        iov[i].write(libc::iovec {
            iov_base: frames[i].as_ptr() as *mut libc::c_void,
            iov_len: frames[i].len(),
        });
        // SAFETY: mmsghdr is plain old data; all-zero is valid (null name, no control).
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_iov = iov[i].as_mut_ptr();
        h.msg_hdr.msg_iovlen = 1;
        if let Some(p) = peer {
            h.msg_hdr.msg_name = (&p.addr as *const libc::sockaddr_un as *mut libc::sockaddr_un).cast();
            h.msg_hdr.msg_namelen = p.len;
        }
        hdrs[i].write(h);
    }
    // SAFETY: the first n headers are initialised and point at iovecs over live frames
    // (the kernel only reads them for a send) and at a live peer address; all outlive
    // the call.
    let sent = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}
