//! Handing a socketpair port's VM end to an API client: SCM_RIGHTS on the API
//! connection itself, after an HTTP upgrade (`Upgrade: vmfabric-fd`). The daemon sends
//! one message, the port as JSON, with the fd attached; the connection then closes.
//! rustix's safe sendmsg/recvmsg wrappers carry the ancillary data, so no `unsafe`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// The protocol name in the `Upgrade` header.
pub const PROTOCOL: &str = "vmfabric-fd";

/// After the upgrade the client sends this one byte, and only then does the daemon
/// send the fd: the client's HTTP reader has stopped reading by then, so the message
/// cannot be swallowed by a plain read (which would discard the fd).
pub const READY: u8 = b'!';

/// Sends `payload` with `fd` attached over a connected Unix stream.
pub fn send_with_fd(sock: impl AsFd, payload: &[u8], fd: impl AsFd) -> std::io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("ancillary buffer too small"));
    }
    let mut sent = rustix::net::sendmsg(&sock, &[IoSlice::new(payload)], &mut control, SendFlags::NOSIGNAL)?;
    // The fd went with the first bytes; the rest of a long payload follows plainly.
    while sent < payload.len() {
        sent += rustix::net::send(&sock, &payload[sent..], SendFlags::NOSIGNAL)?;
    }
    Ok(())
}

/// Receives a message and the fd attached to it; reads until the peer closes.
pub fn recv_with_fd(sock: impl AsFd) -> std::io::Result<(Vec<u8>, OwnedFd)> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut buf = vec![0u8; 64 * 1024];
    let msg = rustix::net::recvmsg(
        &sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut data = buf[..msg.bytes].to_vec();
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            fd = fds.into_iter().next();
        }
    }
    let fd = fd.ok_or_else(|| std::io::Error::other("the daemon sent no fd"))?;
    loop {
        let (n, _) = rustix::net::recv(&sock, &mut buf, RecvFlags::empty())?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Ok((data, fd))
}
