//! Sending: one send routine and one errno table for a first attempt and for the
//! drain of a port's backlog; a stream port's queued bytes.

use super::*;

impl Fabric {
    pub(super) fn transmit(&mut self, d: u32, idx: &[u16], frames: &[&[u8]]) {
        let mut list: [&[u8]; BATCH] = [&[]; BATCH];
        for (slot, i) in list.iter_mut().zip(idx) {
            *slot = frames[*i as usize];
        }
        let list = &list[..idx.len()];
        let Some(port) = self.port_mut(d) else { return };
        if !port.up {
            self.count_drop(d, DropReason::PeerGone, list.len() as u64);
            return;
        }
        if let Kind::Stream { .. } = port.kind {
            self.queue_stream(d, list);
            return;
        }
        if !port.backlog.is_empty() {
            self.enqueue(d, list);
            return;
        }
        let mut off = 0;
        while off < list.len() {
            let Some(port) = self.port(d) else { return };
            match send_frames(&port.kind, &list[off..]) {
                Ok(k) => {
                    let bytes = list[off..off + k].iter().map(|f| f.len() as u64).sum();
                    port.shared.counters.add_tx(k as u64, bytes);
                    self.net(port.net).shared.counters.add_tx(k as u64, bytes);
                    off += k;
                }
                Err(e) => match send_failure(&e, &port.kind) {
                    SendFailure::Later => {
                        self.enqueue(d, &list[off..]);
                        return;
                    }
                    SendFailure::Retry => {}
                    SendFailure::Drop(reason) => {
                        self.count_drop(d, reason, 1);
                        off += 1;
                    }
                    SendFailure::Down => {
                        self.count_drop(d, DropReason::PeerGone, (list.len() - off) as u64);
                        self.port_down(d, format!("send failed: {e}"));
                        return;
                    }
                },
            }
        }
    }

    /// Copies frames into the port's backlog (bounded) and asks for writability.
    pub(super) fn enqueue(&mut self, d: u32, frames: &[&[u8]]) {
        let cap = self.egress_queue_frames;
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let mut dropped = 0;
        for f in frames {
            if port.backlog.len() >= cap {
                dropped += 1;
                continue;
            }
            let mut b = self.spare.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(f);
            port.backlog.push_back(b);
        }
        self.count_drop(d, DropReason::QueueFull, dropped);
        self.set_out_interest(d, true);
    }

    pub(super) fn set_out_interest(&mut self, d: u32, want: bool) {
        let Some(port) = self.port(d) else { return };
        if port.out_armed == want {
            return;
        }
        let Some((fd, conn)) = port.writable_fd() else {
            return;
        };
        let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if want {
            flags |= epoll::EventFlags::OUT;
        }
        if let Err(e) = epoll::modify(&self.epoll, fd, epoll::EventData::new_u64(token(d, conn)), flags) {
            warn!(port = %port.id, "epoll modify failed: {e}");
            return;
        }
        if let Some(p) = self.port_mut(d) {
            p.out_armed = want;
        }
    }

    /// The port became writable: send what waits.
    pub(super) fn drain_backlog(&mut self, d: u32) {
        let Some(port) = self.port(d) else { return };
        if let Kind::Stream { .. } = port.kind {
            self.flush_stream(d);
            return;
        }
        loop {
            let Some(port) = self.ports[d as usize].as_mut() else {
                return;
            };
            if port.backlog.is_empty() {
                break;
            }
            let mut list: [&[u8]; BATCH] = [&[]; BATCH];
            for (s, f) in list.iter_mut().zip(&port.backlog) {
                *s = f;
            }
            let n = port.backlog.len().min(BATCH);
            match send_frames(&port.kind, &list[..n]) {
                Ok(k) => {
                    let mut bytes = 0;
                    for _ in 0..k {
                        let buf = port.backlog.pop_front().expect("k <= backlog length");
                        bytes += buf.len() as u64;
                        if self.spare.len() < SPARE_BUFFERS {
                            self.spare.push(buf);
                        }
                    }
                    port.shared.counters.add_tx(k as u64, bytes);
                    let net = port.net;
                    self.net(net).shared.counters.add_tx(k as u64, bytes);
                }
                Err(e) => match send_failure(&e, &port.kind) {
                    SendFailure::Later => return,
                    SendFailure::Retry => {}
                    SendFailure::Drop(reason) => {
                        port.backlog.pop_front();
                        self.count_drop(d, reason, 1);
                    }
                    SendFailure::Down => {
                        self.port_down(d, format!("send failed: {e}"));
                        return;
                    }
                },
            }
        }
        self.set_out_interest(d, false);
    }

    pub(super) fn queue_stream(&mut self, d: u32, frames: &[&[u8]]) {
        let cap = self.stream_queue_bytes;
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let Kind::Stream { conn: Some(c), .. } = &mut port.kind else {
            self.count_drop(d, DropReason::PeerGone, frames.len() as u64);
            return;
        };
        let (mut queued, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        for f in frames {
            if c.tx.len() - c.tx_off + 4 + f.len() > cap {
                dropped += 1;
                continue;
            }
            c.tx.extend_from_slice(&(f.len() as u32).to_be_bytes());
            c.tx.extend_from_slice(f);
            queued += 1;
            bytes += f.len() as u64;
        }
        // Counted as sent once the stream has taken them: the bytes are in order
        // behind what is already queued and will follow unless the peer goes away.
        port.shared.counters.add_tx(queued, bytes);
        let net = port.net;
        self.net(net).shared.counters.add_tx(queued, bytes);
        self.count_drop(d, DropReason::QueueFull, dropped);
        self.flush_stream(d);
    }

    pub(super) fn flush_stream(&mut self, d: u32) {
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let Kind::Stream { conn: Some(c), .. } = &mut port.kind else {
            return;
        };
        let mut failed = None;
        while c.tx_off < c.tx.len() {
            match rustix::io::write(&c.fd, &c.tx[c.tx_off..]) {
                Ok(n) => c.tx_off += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if c.tx_off == c.tx.len() {
            c.tx.clear();
            c.tx_off = 0;
        } else if c.tx_off > c.tx.len() / 2 {
            c.tx.drain(..c.tx_off);
            c.tx_off = 0;
        }
        let waiting = !c.tx.is_empty();
        if let Some(e) = failed {
            self.port_down(d, format!("stream write failed: {e}"));
            return;
        }
        self.set_out_interest(d, waiting);
    }
}

/// Sends frames on a datagram or TAP port: a batch on sockets, one frame on a TAP.
/// Returns how many went. (Stream ports queue bytes instead: `queue_stream`.)
fn send_frames(kind: &Kind, frames: &[&[u8]]) -> io::Result<usize> {
    match kind {
        Kind::Connected(fd) => send_batch(fd.as_fd(), frames, None),
        Kind::Path { sock, peer: Some(p) } => send_batch(sock.as_fd(), frames, Some(p)),
        Kind::Path { peer: None, .. } => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
        Kind::Tap(fd) => rustix::io::write(fd, frames[0]).map(|_| 1).map_err(io::Error::from),
        Kind::Stream { .. } => Err(io::Error::other("stream ports queue bytes, not frames")),
    }
}

/// What a failed send means, for the frame at the head and for the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFailure {
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

/// The one errno table of the send paths (transmit and the backlog drain), so a
/// condition is never counted under two reasons.
fn send_failure(e: &io::Error, kind: &Kind) -> SendFailure {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::WouldBlock, _) => SendFailure::Later,
        (io::ErrorKind::Interrupted, _) => SendFailure::Retry,
        (_, Some(libc::EMSGSIZE)) => SendFailure::Drop(DropReason::Oversize),
        (_, Some(libc::ENOBUFS)) => SendFailure::Drop(DropReason::QueueFull),
        // A TAP whose interface is administratively down refuses frames with EIO; it
        // is still there and will take frames once it is up.
        (_, Some(libc::EIO)) if matches!(kind, Kind::Tap(_)) => SendFailure::Drop(DropReason::PeerGone),
        _ => SendFailure::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_errno_table_for_both_send_paths() {
        let sock = || {
            let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
            Kind::Connected(a.into())
        };
        let err = |n| io::Error::from_raw_os_error(n);
        let udp = sock();
        assert_eq!(send_failure(&err(libc::EAGAIN), &udp), SendFailure::Later);
        assert_eq!(send_failure(&err(libc::EINTR), &udp), SendFailure::Retry);
        assert_eq!(
            send_failure(&err(libc::EMSGSIZE), &udp),
            SendFailure::Drop(DropReason::Oversize)
        );
        assert_eq!(
            send_failure(&err(libc::ENOBUFS), &udp),
            SendFailure::Drop(DropReason::QueueFull)
        );
        assert_eq!(
            send_failure(&err(libc::EIO), &udp),
            SendFailure::Down,
            "EIO is only a TAP's 'down'"
        );
        assert_eq!(send_failure(&err(libc::ECONNREFUSED), &udp), SendFailure::Down);
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Kind::Tap(a.into());
        assert_eq!(
            send_failure(&err(libc::EIO), &tap),
            SendFailure::Drop(DropReason::PeerGone)
        );
    }
}
