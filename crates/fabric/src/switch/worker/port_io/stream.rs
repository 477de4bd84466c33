//! Stream ports (QEMU `-netdev stream`, passt): a listening path and the one VMM
//! connected to it; each frame is a 4-byte big-endian length and the frame.
//!
//! Frames are forwarded straight out of the connection's receive buffer: the buffer is
//! lent to the worker's receive buffers for the batch (`recv` → `lend_back`), because
//! forwarding needs the whole switch while the buffer belongs to one of its ports.

use std::io;
use std::mem;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;
use tracing::warn;

use super::{Batch, IoLimits, Source, Trouble};
use crate::port::PortId;
use crate::switch::worker::{token, RxBuffers};
use crate::sys::mmsg::BATCH;
use crate::transport;

/// Room in the receive buffer beyond one maximal frame, so one read usually brings
/// many frames.
const RX_SLACK: usize = 256 << 10;
const LEN_PREFIX: usize = 4;

pub(in crate::switch::worker) struct Stream {
    listener: OwnedFd,
    conn: Option<Conn>,
    queue_cap: usize,
    socket_buffer_bytes: usize,
}

struct Conn {
    fd: OwnedFd,
    rx: Vec<u8>,
    /// `rx[start..len]` is received and not yet taken apart.
    start: usize,
    len: usize,
    /// Bytes of an oversize frame still to skip.
    discard: usize,
    /// Why the stream ended, once it has: reported when its last frames are out.
    ended: Option<String>,
    /// The last write met a full socket: no more writes until epoll says writable.
    blocked: bool,
    tx: Vec<u8>,
    tx_off: usize,
}

impl Conn {
    /// Takes up to a batch of whole frames out of the buffer into `spans`; frames
    /// longer than `max_frame` are skipped (the length says where the next starts, so
    /// the stream stays in step) and counted as cut.
    fn take_frames(&mut self, spans: &mut [(usize, usize); BATCH], max_frame: usize) -> (usize, u64, u64) {
        let (mut k, mut cut, mut cut_bytes) = (0, 0u64, 0u64);
        let skip = self.discard.min(self.len - self.start);
        self.discard -= skip;
        self.start += skip;
        while k < BATCH && self.discard == 0 && self.len - self.start >= LEN_PREFIX {
            let prefix: [u8; LEN_PREFIX] = self.rx[self.start..self.start + LEN_PREFIX]
                .try_into()
                .expect("prefix length checked");
            let flen = u32::from_be_bytes(prefix) as usize;
            let avail = self.len - self.start - LEN_PREFIX;
            if flen > max_frame {
                let skip = flen.min(avail);
                self.discard = flen - skip;
                self.start += LEN_PREFIX + skip;
                cut += 1;
                cut_bytes += flen as u64;
                continue;
            }
            if avail < flen {
                break;
            }
            spans[k] = (self.start + LEN_PREFIX, flen);
            k += 1;
            self.start += LEN_PREFIX + flen;
        }
        (k, cut, cut_bytes)
    }

    /// Moves the unfinished frame to the front, making room for the next read.
    fn compact(&mut self) {
        self.rx.copy_within(self.start..self.len, 0);
        self.len -= self.start;
        self.start = 0;
    }

    fn flush(&mut self) -> io::Result<bool> {
        self.blocked = false;
        while self.tx_off < self.tx.len() {
            match rustix::io::write(&self.fd, &self.tx[self.tx_off..]) {
                Ok(n) => self.tx_off += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    self.blocked = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off > self.tx.len() / 2 {
            self.tx.drain(..self.tx_off);
            self.tx_off = 0;
        }
        Ok(self.tx.is_empty())
    }
}

impl Stream {
    pub(super) fn new(listener: OwnedFd, limits: &IoLimits) -> Stream {
        Stream {
            listener,
            conn: None,
            queue_cap: limits.stream_queue_bytes,
            socket_buffer_bytes: limits.socket_buffer_bytes,
        }
    }

    pub(super) fn listener(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    pub(super) fn conn_fd(&self) -> Option<BorrowedFd<'_>> {
        self.conn.as_ref().map(|c| c.fd.as_fd())
    }

    pub(super) fn unwatch(&self, epoll: &OwnedFd) {
        let _ = epoll::delete(epoll, &self.listener);
        if let Some(c) = &self.conn {
            let _ = epoll::delete(epoll, &c.fd);
        }
    }

    pub(super) fn down(&mut self, epoll: &OwnedFd) {
        if let Some(c) = self.conn.take() {
            let _ = epoll::delete(epoll, &c.fd);
        }
    }

    /// Accepts until EAGAIN (the listener is edge-triggered). One VMM per port: a
    /// second connection is refused. True if a VMM connected.
    pub(super) fn accept(&mut self, epoll: &OwnedFd, slot: u32, id: PortId, max_frame: usize) -> bool {
        let mut connected = false;
        loop {
            let fd = match rustix::net::accept_with(&self.listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return connected,
                Err(e) => {
                    warn!(port = %id, "accept failed: {e}");
                    return connected;
                }
            };
            if self.conn.is_some() {
                warn!(port = %id, "refused a second connection: one VMM per stream port");
                continue;
            }
            transport::size_buffers(&fd, self.socket_buffer_bytes);
            if let Err(e) = epoll::add(
                epoll,
                &fd,
                epoll::EventData::new_u64(token(slot, true)),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            ) {
                warn!(port = %id, "cannot watch the new connection: {e}");
                continue;
            }
            self.conn = Some(Conn {
                fd,
                rx: vec![0; max_frame + LEN_PREFIX + RX_SLACK],
                start: 0,
                len: 0,
                discard: 0,
                ended: None,
                blocked: false,
                tx: Vec::with_capacity(64 << 10),
                tx_off: 0,
            });
            connected = true;
        }
    }

    /// Whole frames already buffered come first; a read (at most one per call, and
    /// only if `may_read`) when none are left.
    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_frame: usize, may_read: bool) -> Batch {
        let Some(c) = self.conn.as_mut() else {
            return Batch::nothing(false, false);
        };
        let (mut read, mut cut, mut cut_bytes) = (false, 0, 0);
        loop {
            let (k, more_cut, more_cut_bytes) = c.take_frames(&mut rx.spans, max_frame);
            cut += more_cut;
            cut_bytes += more_cut_bytes;
            let mut batch = Batch::nothing(read, true);
            (batch.cut, batch.cut_bytes) = (cut, cut_bytes);
            if k > 0 {
                rx.stream = mem::take(&mut c.rx);
                (batch.source, batch.frames) = (Source::Stream, k);
                return batch;
            }
            if let Some(reason) = c.ended.take() {
                batch.trouble = Some(Trouble::Down(reason));
                batch.more = false;
                return batch;
            }
            if read || !may_read {
                // A read brought part of a frame (go on, it counts as a turn), or the
                // turn is over (epoll reports the rest).
                batch.more = read;
                return batch;
            }
            c.compact();
            read = true;
            match rustix::io::read(&c.fd, &mut c.rx[c.len..]) {
                Ok(0) => c.ended = Some("the peer closed the stream".to_string()),
                Ok(n) => c.len += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    batch.read = true;
                    batch.more = false;
                    return batch;
                }
                Err(e) => c.ended = Some(format!("stream read failed: {e}")),
            }
        }
    }

    pub(super) fn lend_back(&mut self, rx: &mut RxBuffers) {
        if let Some(c) = self.conn.as_mut() {
            if c.rx.is_empty() {
                c.rx = mem::take(&mut rx.stream);
            }
        }
    }

    /// Queues the frames that fit under the byte cap and writes what the socket
    /// takes. A stream's bound is its byte queue: a frame that does not fit is
    /// refused with `ENOBUFS` (dropped as queue-full), never held in a backlog.
    pub(super) fn send(&mut self, frames: &[&[u8]]) -> io::Result<usize> {
        let cap = self.queue_cap;
        let Some(c) = self.conn.as_mut() else {
            return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
        };
        let fits = |c: &Conn, f: &[u8]| c.tx.len() - c.tx_off + LEN_PREFIX + f.len() <= cap;
        if !c.blocked && !frames.first().is_some_and(|f| fits(c, f)) {
            c.flush()?;
        }
        let mut queued = 0;
        for f in frames {
            if !fits(c, f) {
                break;
            }
            c.tx.extend_from_slice(&(f.len() as u32).to_be_bytes());
            c.tx.extend_from_slice(f);
            queued += 1;
        }
        if queued == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        // Counted as sent once the stream has taken them: the bytes are in order
        // behind what is already queued and follow unless the peer goes away.
        if !c.blocked {
            c.flush()?;
        }
        Ok(queued)
    }

    pub(super) fn flush(&mut self) -> io::Result<bool> {
        self.conn.as_mut().map_or(Ok(true), Conn::flush)
    }

    pub(super) fn pending_out(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.tx_off < c.tx.len())
    }
}

#[cfg(test)]
mod tests {
    //! The framing alone, over a real socketpair standing for the VMM's connection.
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    const MAX: usize = 1514;

    fn connected() -> (Stream, UnixStream) {
        let (ours, vm) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (listener, _) = UnixStream::pair().unwrap();
        let limits = IoLimits {
            stream_queue_bytes: 1 << 16,
            socket_buffer_bytes: 1 << 16,
        };
        let mut s = Stream::new(listener.into(), &limits);
        s.conn = Some(Conn {
            fd: ours.into(),
            rx: vec![0; MAX + LEN_PREFIX + RX_SLACK],
            start: 0,
            len: 0,
            discard: 0,
            ended: None,
            blocked: false,
            tx: Vec::new(),
            tx_off: 0,
        });
        (s, vm)
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Receives until the stream reports trouble, or has had nothing more for a few
    /// tries in a row (as epoll would wake the worker again, the tries stand for its
    /// later turns); the frames, the cut count and the trouble.
    fn drain(s: &mut Stream, rx: &mut RxBuffers) -> (Vec<Vec<u8>>, u64, Option<Trouble>) {
        let (mut got, mut cut, mut idle) = (Vec::new(), 0, 0);
        loop {
            let b = s.recv(rx, MAX, true);
            cut += b.cut;
            got.extend(super::super::frames_of(rx, &b)[..b.frames].iter().map(|f| f.to_vec()));
            s.lend_back(rx);
            if b.trouble.is_some() {
                return (got, cut, b.trouble);
            }
            idle = if b.more || b.frames > 0 { 0 } else { idle + 1 };
            if idle == 20 {
                return (got, cut, None);
            }
            if !b.more {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_frame_split_across_reads_comes_out_whole() {
        let (mut s, mut vm) = connected();
        let mut rx = RxBuffers::new();
        let f = framed(&[7u8; 300]);
        vm.write_all(&f[..100]).unwrap();
        let (got, cut, trouble) = drain(&mut s, &mut rx);
        assert!(got.is_empty() && cut == 0 && trouble.is_none());
        vm.write_all(&f[100..]).unwrap();
        let (got, _, _) = drain(&mut s, &mut rx);
        assert_eq!(got, vec![vec![7u8; 300]]);
    }

    #[test]
    fn an_oversize_frame_is_skipped_across_reads_and_the_stream_stays_in_step() {
        let (mut s, mut vm) = connected();
        let mut rx = RxBuffers::new();
        let big = framed(&vec![1u8; MAX + 500]);
        vm.write_all(&big[..1000]).unwrap();
        let (got, cut, _) = drain(&mut s, &mut rx);
        assert!(got.is_empty());
        assert_eq!(cut, 1, "counted once, when its length is seen");
        vm.write_all(&big[1000..]).unwrap();
        vm.write_all(&framed(&[2u8; 60])).unwrap();
        let (got, cut, _) = drain(&mut s, &mut rx);
        assert_eq!(cut, 0);
        assert_eq!(got, vec![vec![2u8; 60]]);
    }

    #[test]
    fn more_frames_than_a_batch_all_come_out_and_a_close_follows_the_last() {
        let (mut s, mut vm) = connected();
        let mut rx = RxBuffers::new();
        let n = BATCH * 3 + 5;
        for i in 0..n {
            vm.write_all(&framed(&[i as u8; 64])).unwrap();
        }
        drop(vm);
        let (got, _, trouble) = drain(&mut s, &mut rx);
        assert_eq!(got.len(), n);
        assert!(got.iter().enumerate().all(|(i, f)| f[0] == i as u8), "in order");
        assert!(matches!(trouble, Some(Trouble::Down(_))), "{trouble:?}");
    }

    #[test]
    fn a_full_queue_refuses_frames_as_no_buffer_space_and_keeps_what_it_took() {
        let (mut s, vm) = connected();
        let frame = [3u8; 1000];
        let mut taken = 0;
        let refused = loop {
            match s.send(&[&frame]) {
                Ok(n) => taken += n,
                Err(e) => break e,
            }
        };
        assert_eq!(refused.raw_os_error(), Some(libc::ENOBUFS));
        assert!(s.pending_out());
        drop(vm);
        assert!(taken > 0);
    }
}
