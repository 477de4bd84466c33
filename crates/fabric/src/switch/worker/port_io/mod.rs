//! The transports behind a port, and the one place that tells them apart: the rest of
//! the worker asks a [`PortIo`] to receive a batch, send frames, flush, go down or be
//! watched, and never looks at which transport it is.
//!
//! One file per transport: `datagram.rs` (socketpairs and bound datagram paths, a batch
//! per system call), `stream.rs` (a listening path and the one VMM connected to it,
//! length-prefixed frames), `tap.rs` (a TAP fd, a frame per system call), `ring.rs` (an
//! in-process port: queues shared with another thread, a wake-up per batch).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::event::epoll;

use super::{token, RxBuffers};
use crate::counters::DropReason;
use crate::offload::Offload;
use crate::port::PortId;
use crate::sys::mmsg::{UnixPeer, BATCH};

mod datagram;
mod ring;
mod stream;
mod tap;

use datagram::Datagram;
use ring::Ring;
use stream::Stream;
use tap::Tap;

/// The fd a new port is served through, as the handle gives it to the worker.
pub(crate) enum PortFd {
    /// A socketpair end: connected, the peer is fixed.
    Connected(OwnedFd),
    /// A bound datagram path; the peer is whoever sends to it.
    Path(OwnedFd),
    /// A listening stream path.
    Listener(OwnedFd),
    /// A TAP fd; `vnet_hdr` is the length of the virtio-net header its frames carry.
    Tap { fd: OwnedFd, vnet_hdr: Option<usize> },
    /// Queues shared with a thread of this process that serves the port.
    Ring(std::sync::Arc<crate::ring::FrameRing>),
}

/// What transports take from the switch's configuration.
pub(super) struct IoLimits {
    /// Bytes a stream port may hold that its peer has not read yet.
    pub stream_queue_bytes: usize,
    pub socket_buffer_bytes: usize,
}

pub(super) enum PortIo {
    Datagram(Datagram),
    Stream(Stream),
    Tap(Tap),
    Ring(Ring),
}

/// Where the frames of a received batch are in the receive buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// `bufs[..frames]`, each `meta[i].len` long.
    Bufs,
    /// `spans[..frames]` of `stream` (a stream port's buffer, lent until `lend_back`).
    Stream,
    /// `owned[..frames]`, an in-process port's buffers (given back by `lend_back`).
    Owned,
}

/// What went wrong with a receive that the worker must act on.
#[derive(Debug)]
pub(super) enum Trouble {
    /// The peer is gone: the port goes down.
    Down(String),
    /// A failure that leaves the port as it is (logged).
    Warn(String),
}

/// One receive: the frames it brought and what the worker does next.
#[derive(Debug)]
pub(super) struct Batch {
    pub source: Source,
    pub frames: usize,
    /// Frames received too long for the network, dropped already (with their bytes).
    pub cut: u64,
    pub cut_bytes: u64,
    /// `rx.offloads[..frames]` holds what each frame's virtio-net header said; false:
    /// every frame is plain.
    pub offloaded: bool,
    /// Frames whose virtio-net header was unusable, dropped already.
    pub malformed: u64,
    /// A datagram path's sender, when it is a named socket that can be answered.
    pub peer: Option<UnixPeer>,
    /// An in-process port's peer connected (described).
    pub up: Option<String>,
    /// A system call was made (counts against the port's turn).
    pub read: bool,
    /// Call again: there may be more now.
    pub more: bool,
    pub trouble: Option<Trouble>,
}

impl Batch {
    fn nothing(read: bool, more: bool) -> Batch {
        Batch {
            source: Source::Bufs,
            frames: 0,
            cut: 0,
            cut_bytes: 0,
            offloaded: false,
            malformed: 0,
            peer: None,
            up: None,
            read,
            more,
            trouble: None,
        }
    }
}

/// What a failed send means, for the frame at the head and for the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendFailure {
    /// The socket is full: keep the frames and wait for writability.
    Later,
    /// Interrupted: send again now.
    Retry,
    /// This frame cannot go (too big, no kernel buffers, a TAP that is down): count it
    /// and go on with the next.
    Drop(DropReason),
    /// The peer is gone: the port goes down.
    Down,
}

/// The one errno table of the send paths (a first attempt and the backlog drain), so a
/// condition is never counted under two reasons.
fn send_failure(e: &io::Error, is_tap: bool) -> SendFailure {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::WouldBlock, _) => SendFailure::Later,
        (io::ErrorKind::Interrupted, _) => SendFailure::Retry,
        (_, Some(libc::EMSGSIZE)) => SendFailure::Drop(DropReason::Oversize),
        (_, Some(libc::ENOBUFS)) => SendFailure::Drop(DropReason::QueueFull),
        // A TAP whose interface is administratively down refuses frames with EIO; it
        // is still there and will take frames once it is up.
        (_, Some(libc::EIO)) if is_tap => SendFailure::Drop(DropReason::PeerGone),
        _ => SendFailure::Down,
    }
}

impl PortIo {
    pub(super) fn open(fd: PortFd, limits: &IoLimits) -> PortIo {
        match fd {
            PortFd::Connected(fd) => PortIo::Datagram(Datagram::connected(fd)),
            PortFd::Path(fd) => PortIo::Datagram(Datagram::path(fd)),
            PortFd::Listener(fd) => PortIo::Stream(Stream::new(fd, limits)),
            PortFd::Tap { fd, vnet_hdr } => PortIo::Tap(Tap::new(fd, vnet_hdr)),
            PortFd::Ring(ring) => PortIo::Ring(Ring::new(ring)),
        }
    }

    /// A port whose peer is there from the start (a socketpair, a TAP) is up at once;
    /// the others wait for their peer to show itself.
    pub(super) fn up_at_once(&self) -> bool {
        match self {
            PortIo::Datagram(d) => d.peer_fixed(),
            PortIo::Stream(_) | PortIo::Ring(_) => false,
            PortIo::Tap(_) => true,
        }
    }

    pub(super) fn watch(&self, epoll: &OwnedFd, slot: u32) -> io::Result<()> {
        let (fd, flags) = match self {
            PortIo::Datagram(d) => (d.fd(), epoll::EventFlags::IN),
            // Edge-triggered: accept runs until EAGAIN, and a failing accept (EMFILE)
            // must not spin.
            PortIo::Stream(s) => (s.listener(), epoll::EventFlags::IN | epoll::EventFlags::ET),
            PortIo::Tap(t) => (t.fd(), epoll::EventFlags::IN),
            PortIo::Ring(r) => (r.fd(), epoll::EventFlags::IN),
        };
        epoll::add(epoll, fd, epoll::EventData::new_u64(token(slot, false)), flags)?;
        Ok(())
    }

    /// Stops watching every fd of the port (it is being removed).
    pub(super) fn unwatch(&self, epoll: &OwnedFd) {
        match self {
            PortIo::Datagram(d) => {
                let _ = epoll::delete(epoll, d.fd());
            }
            PortIo::Stream(s) => s.unwatch(epoll),
            PortIo::Tap(t) => {
                let _ = epoll::delete(epoll, t.fd());
            }
            PortIo::Ring(r) => {
                let _ = epoll::delete(epoll, r.fd());
            }
        }
    }

    /// The fd epoll watches for writability, if the port can be written now, and
    /// whether it is a stream's connection (its token says so).
    pub(super) fn writable_fd(&self) -> Option<(BorrowedFd<'_>, bool)> {
        match self {
            PortIo::Datagram(d) => Some((d.fd(), false)),
            PortIo::Stream(s) => s.conn_fd().map(|fd| (fd, true)),
            PortIo::Tap(t) => Some((t.fd(), false)),
            // Room in the ring is announced on the wake-up it reads from.
            PortIo::Ring(_) => None,
        }
    }

    /// Room to send is announced by the same wake-up as frames to receive.
    pub(super) fn room_wakes_reader(&self) -> bool {
        matches!(self, PortIo::Ring(_))
    }

    /// The watched fd is a listener: readable means a VMM is connecting.
    pub(super) fn listens(&self) -> bool {
        matches!(self, PortIo::Stream(_))
    }

    /// Receives one batch into `rx`. `may_read` false: only frames already buffered.
    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_len: usize, may_read: bool) -> Batch {
        match self {
            PortIo::Datagram(d) if may_read => d.recv(rx, max_len),
            PortIo::Tap(t) if may_read => t.recv(rx, max_len),
            PortIo::Ring(r) if may_read => r.recv(rx, max_len),
            PortIo::Datagram(_) | PortIo::Tap(_) | PortIo::Ring(_) => Batch::nothing(false, false),
            PortIo::Stream(s) => s.recv(rx, max_len, may_read),
        }
    }

    /// The batch is forwarded: a stream takes its buffer back.
    pub(super) fn lend_back(&mut self, rx: &mut RxBuffers) {
        match self {
            PortIo::Stream(s) => s.lend_back(rx),
            PortIo::Ring(r) => r.lend_back(rx),
            PortIo::Datagram(_) | PortIo::Tap(_) => {}
        }
    }

    /// The port takes frames as offloaded as they came (a TAP with virtio-net headers);
    /// the others get them segmented and checksummed first.
    pub(super) fn takes_offloads(&self) -> bool {
        match self {
            PortIo::Tap(t) => t.has_vnet_hdr(),
            PortIo::Ring(r) => r.takes_offloads(),
            PortIo::Datagram(_) | PortIo::Stream(_) => false,
        }
    }

    /// Sends from the head of `frames`; returns how many went (at least one). Offloads
    /// other than plain go only to a port that [`takes_offloads`](Self::takes_offloads).
    pub(super) fn send(&mut self, frames: &[&[u8]], offloads: &[Offload]) -> io::Result<usize> {
        let sent = match self {
            PortIo::Datagram(d) => d.send(frames),
            PortIo::Stream(s) => s.send(frames),
            PortIo::Tap(t) => t.send(frames, offloads),
            PortIo::Ring(r) => r.send(frames, offloads),
        }?;
        if sent == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(sent)
    }

    /// Writes what the transport itself holds (a stream's queued bytes); true when
    /// nothing waits any more.
    pub(super) fn flush(&mut self) -> io::Result<bool> {
        match self {
            PortIo::Stream(s) => s.flush(),
            PortIo::Datagram(_) | PortIo::Tap(_) | PortIo::Ring(_) => Ok(true),
        }
    }

    /// Bytes wait inside the transport for the peer to read.
    pub(super) fn pending_out(&self) -> bool {
        match self {
            PortIo::Stream(s) => s.pending_out(),
            PortIo::Datagram(_) | PortIo::Tap(_) | PortIo::Ring(_) => false,
        }
    }

    pub(super) fn send_failure(&self, e: &io::Error) -> SendFailure {
        send_failure(e, matches!(self, PortIo::Tap(_)))
    }

    /// A datagram path's peer is now `peer`; true if that changed it.
    pub(super) fn set_peer(&mut self, peer: UnixPeer) -> bool {
        match self {
            PortIo::Datagram(d) => d.set_peer(peer),
            PortIo::Stream(_) | PortIo::Tap(_) | PortIo::Ring(_) => false,
        }
    }

    /// The peer is gone: forget it, and stop polling what can never come back.
    /// Returns the frames that waited inside the transport and are dropped.
    pub(super) fn down(&mut self, epoll: &OwnedFd, slot: u32, out_armed: bool) -> u64 {
        match self {
            PortIo::Datagram(d) => d.down(epoll, slot, out_armed),
            PortIo::Stream(s) => s.down(epoll),
            PortIo::Tap(t) => {
                let _ = epoll::delete(epoll, t.fd());
            }
            PortIo::Ring(r) => return r.down(),
        }
        0
    }

    /// Accepts a VMM on a stream port; true if one connected.
    pub(super) fn accept(&mut self, epoll: &OwnedFd, slot: u32, id: PortId, max_frame: usize) -> bool {
        match self {
            PortIo::Stream(s) => s.accept(epoll, slot, id, max_frame),
            PortIo::Datagram(_) | PortIo::Tap(_) | PortIo::Ring(_) => false,
        }
    }
}

/// The frames of `batch` as slices of the receive buffers.
pub(super) fn frames_of<'a>(rx: &'a RxBuffers, batch: &Batch) -> [&'a [u8]; BATCH] {
    let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
    match batch.source {
        Source::Bufs => {
            for ((f, buf), meta) in frames.iter_mut().zip(&rx.bufs).zip(&rx.meta[..batch.frames]) {
                *f = &buf[..meta.len];
            }
        }
        Source::Stream => {
            for (f, &(start, len)) in frames.iter_mut().zip(&rx.spans[..batch.frames]) {
                *f = &rx.stream[start..start + len];
            }
        }
        Source::Owned => {
            for (f, b) in frames.iter_mut().zip(&rx.owned[..batch.frames]) {
                *f = b;
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_errno_table_for_both_send_paths() {
        let err = |n| io::Error::from_raw_os_error(n);
        for is_tap in [false, true] {
            assert_eq!(send_failure(&err(libc::EAGAIN), is_tap), SendFailure::Later);
            assert_eq!(send_failure(&err(libc::EINTR), is_tap), SendFailure::Retry);
            assert_eq!(
                send_failure(&err(libc::EMSGSIZE), is_tap),
                SendFailure::Drop(DropReason::Oversize)
            );
            assert_eq!(
                send_failure(&err(libc::ENOBUFS), is_tap),
                SendFailure::Drop(DropReason::QueueFull)
            );
            assert_eq!(send_failure(&err(libc::ECONNREFUSED), is_tap), SendFailure::Down);
        }
        assert_eq!(
            send_failure(&err(libc::EIO), false),
            SendFailure::Down,
            "EIO is only a TAP's 'down'"
        );
        assert_eq!(
            send_failure(&err(libc::EIO), true),
            SendFailure::Drop(DropReason::PeerGone)
        );
    }
}
