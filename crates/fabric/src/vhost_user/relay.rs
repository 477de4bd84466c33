//! A relay between the VMM's connection and `vhost-user-backend`'s, for one reason:
//! QEMU up to at least 7.2 (Debian 12's) sends SET_VRING_ENABLE as soon as the backend
//! offers VHOST_USER_F_PROTOCOL_FEATURES, before any SET_FEATURES and without that bit
//! in its later SET_FEATURES, while `vhost`'s request handler accepts SET_VRING_ENABLE
//! only once the bit was acked, and ends the connection otherwise. Without protocol
//! features QEMU's vhost-user-net cannot start at all (it enables its rings with that
//! very message). So the relay acks the bit for the VMM: one SET_FEATURES carrying only
//! it goes first, and every SET_FEATURES from the VMM gets it added. Everything else,
//! with the fds riding on each message, passes unchanged; replies flow back as bytes.
//!
//! Only control messages cross the relay (a few dozen per connection); frames never do.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// VHOST_USER_SET_FEATURES.
const SET_FEATURES: u32 = 2;
/// The protocol's version in a message's flags.
const VERSION_1: u32 = 1;
pub(crate) const PROTOCOL_FEATURES: u64 = 1 << 30;
const HEADER_LEN: usize = 12;
/// No vhost-user message is longer (the largest, a memory table, is under 4 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
/// The fds one message may carry (a memory table's regions, at most 509 slots but
/// QEMU sends at most 8 per message).
const MAX_FDS: usize = 32;

/// One message from the VMM: its bytes and the fds that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn header(request: u32, size: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    h[8..].copy_from_slice(&size.to_le_bytes());
    h
}

/// The SET_FEATURES that acks protocol features before the VMM's first message.
pub(crate) fn ack_protocol_features() -> Vec<u8> {
    let mut m = header(SET_FEATURES, 8).to_vec();
    m.extend_from_slice(&PROTOCOL_FEATURES.to_le_bytes());
    m
}

/// Adds the protocol-features bit to a SET_FEATURES message; others are left alone.
pub(crate) fn patch(bytes: &mut [u8]) {
    let request = u32::from_le_bytes(bytes[..4].try_into().expect("a header is 12 bytes"));
    if request != SET_FEATURES || bytes.len() != HEADER_LEN + 8 {
        return;
    }
    let value = u64::from_le_bytes(bytes[HEADER_LEN..].try_into().expect("checked length"));
    bytes[HEADER_LEN..].copy_from_slice(&(value | PROTOCOL_FEATURES).to_le_bytes());
}

/// Reads `buf` full, collecting fds from any part of it; `Ok(false)` at a clean end.
fn read_full(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(more) = m {
                fds.extend(more);
            }
        }
        if msg.bytes == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += msg.bytes;
    }
    Ok(true)
}

fn read_message(sock: &UnixStream) -> std::io::Result<Option<Message>> {
    let mut fds = Vec::new();
    let mut bytes = vec![0u8; HEADER_LEN];
    if !read_full(sock, &mut bytes, &mut fds)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes(bytes[8..12].try_into().expect("12-byte header")) as usize;
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!("a {size}-byte vhost-user message")));
    }
    bytes.resize(HEADER_LEN + size, 0);
    if !read_full(sock, &mut bytes[HEADER_LEN..], &mut fds)? && size > 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Message { bytes, fds }))
}

fn send_message(sock: &UnixStream, m: &Message) -> std::io::Result<()> {
    let fds: Vec<_> = m.fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("too many fds on one vhost-user message"));
    }
    let mut sent = rustix::net::sendmsg(sock, &[IoSlice::new(&m.bytes)], &mut control, SendFlags::NOSIGNAL)?;
    while sent < m.bytes.len() {
        sent += rustix::net::send(sock, &m.bytes[sent..], SendFlags::NOSIGNAL)?;
    }
    Ok(())
}

/// Relays between `vmm` and `backend` until either side closes; then closes both.
pub(crate) fn run(vmm: UnixStream, backend: UnixStream) {
    let (Ok(vmm_out), Ok(mut backend_in)) = (vmm.try_clone(), backend.try_clone()) else {
        return;
    };
    let replies = std::thread::Builder::new()
        .name("vhost-user replies".into())
        .spawn(move || {
            let mut vmm_out = vmm_out;
            let mut buf = [0u8; 4096];
            loop {
                match backend_in.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if vmm_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = vmm_out.shutdown(std::net::Shutdown::Both);
            let _ = backend_in.shutdown(std::net::Shutdown::Both);
        });
    let first = Message {
        bytes: ack_protocol_features(),
        fds: Vec::new(),
    };
    if send_message(&backend, &first).is_ok() {
        while let Ok(Some(mut m)) = read_message(&vmm) {
            patch(&mut m.bytes);
            if send_message(&backend, &m).is_err() {
                break;
            }
        }
    }
    let _ = vmm.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    if let Ok(t) = replies {
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_features_gains_the_protocol_bit_and_nothing_else_changes() {
        let mut m = header(SET_FEATURES, 8).to_vec();
        m.extend_from_slice(&(1u64 << 32).to_le_bytes());
        patch(&mut m);
        assert_eq!(
            u64::from_le_bytes(m[12..].try_into().unwrap()),
            1 << 32 | PROTOCOL_FEATURES
        );
        let mut other = header(3, 8).to_vec();
        other.extend_from_slice(&7u64.to_le_bytes());
        let before = other.clone();
        patch(&mut other);
        assert_eq!(other, before);
    }

    #[test]
    fn messages_cross_with_their_fds() {
        let (vmm_end, relay_vmm) = UnixStream::pair().unwrap();
        let (relay_backend, backend_end) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || run(relay_vmm, relay_backend));
        // A SET_VRING_KICK-like message with an eventfd riding on it.
        let kick = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let mut msg = header(12, 8).to_vec();
        msg.extend_from_slice(&1u64.to_le_bytes());
        send_message(
            &vmm_end,
            &Message {
                bytes: msg.clone(),
                fds: vec![kick],
            },
        )
        .unwrap();
        let first = read_message(&backend_end).unwrap().unwrap();
        assert_eq!(first.bytes, ack_protocol_features());
        let got = read_message(&backend_end).unwrap().unwrap();
        assert_eq!(got.bytes, msg);
        assert_eq!(got.fds.len(), 1, "the fd came along");
        // A reply goes back as it is.
        (&backend_end).write_all(b"reply").unwrap();
        let mut back = [0u8; 5];
        (&vmm_end).read_exact(&mut back).unwrap();
        assert_eq!(&back, b"reply");
        drop(vmm_end);
        t.join().unwrap();
    }
}
