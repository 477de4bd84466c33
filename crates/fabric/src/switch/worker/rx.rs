//! Receiving: a batch per readable port, by transport (`recvmmsg` on datagram
//! sockets, reads until EAGAIN on a TAP, length-prefixed frames out of a stream), and
//! accepting a stream port's VMM.

use super::*;

impl Worker {
    pub(super) fn read_datagrams(&mut self, slot: u32) {
        for _ in 0..ROUNDS_PER_WAKE {
            let Some(port) = self.fab.port(slot) else {
                return;
            };
            let max_len = self.fab.net(port.net).config.max_frame_len();
            let (sock, is_path) = match &port.kind {
                Kind::Connected(fd) => (fd.as_fd(), false),
                Kind::Path { sock, .. } => (sock.as_fd(), true),
                _ => return,
            };
            let peers = if is_path { Some(&mut *self.rx.peers) } else { None };
            let n = match recv_batch(sock, &mut self.rx.bufs, max_len, &mut self.rx.meta, peers) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_peer_gone(&e) => {
                    self.fab.port_down(slot, format!("receive failed: {e}"));
                    return;
                }
                Err(e) => {
                    warn!(port = %self.fab.port_id(slot), "receive failed: {e}");
                    return;
                }
            };
            if is_path {
                if let Some(peer) = self.rx.peers[..n].iter().rev().find(|p| p.is_named()) {
                    self.fab.set_peer(slot, *peer);
                }
            }
            let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
            let mut k = 0;
            let (mut cut, mut cut_bytes) = (0u64, 0u64);
            for (buf, meta) in self.rx.bufs.iter().zip(&self.rx.meta[..n]) {
                if meta.truncated {
                    cut += 1;
                    cut_bytes += meta.len as u64;
                } else {
                    frames[k] = &buf[..meta.len];
                    k += 1;
                }
            }
            self.fab.count_cut(slot, cut, cut_bytes);
            self.fab.forward(slot, &frames[..k]);
            if n < BATCH {
                return;
            }
        }
    }

    pub(super) fn read_tap(&mut self, slot: u32) {
        for _ in 0..ROUNDS_PER_WAKE {
            let Some(port) = self.fab.port(slot) else {
                return;
            };
            let max_len = self.fab.net(port.net).config.max_frame_len();
            let Kind::Tap(fd) = &port.kind else { return };
            let (mut n, mut cut, mut failed) = (0, 0u64, None);
            while n < BATCH {
                // One more byte than allowed: a read that fills it was cut.
                match rustix::io::read(fd, &mut self.rx.bufs[n][..max_len + 1]) {
                    Ok(len) if len > max_len => cut += 1,
                    Ok(len) => {
                        self.rx.meta[n].len = len;
                        n += 1;
                    }
                    Err(Errno::INTR) => {}
                    Err(Errno::AGAIN) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
            for ((f, buf), meta) in frames.iter_mut().zip(&self.rx.bufs).zip(&self.rx.meta[..n]) {
                *f = &buf[..meta.len];
            }
            self.fab.count_cut(slot, cut, cut * (max_len as u64 + 1));
            self.fab.forward(slot, &frames[..n]);
            if let Some(e) = failed {
                self.fab.port_down(slot, format!("TAP read failed: {e}"));
                return;
            }
            if n < BATCH {
                return;
            }
        }
    }

    pub(super) fn read_stream(&mut self, slot: u32) {
        let Some(port) = self.fab.port_mut(slot) else {
            return;
        };
        let net = port.net;
        let Kind::Stream { conn, .. } = &mut port.kind else {
            return;
        };
        let Some(mut c) = conn.take() else { return };
        let max_frame = self.fab.net(net).config.max_frame_len();
        let mut closed = None;
        for _ in 0..ROUNDS_PER_WAKE {
            match rustix::io::read(&c.fd, &mut c.rx[c.rx_len..]) {
                Ok(0) => closed = Some("the peer closed the stream".to_string()),
                Ok(n) => c.rx_len += n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => closed = Some(format!("stream read failed: {e}")),
            }
            let mut off = c.discard.min(c.rx_len);
            c.discard -= off;
            loop {
                let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
                let mut k = 0;
                while k < BATCH && c.discard == 0 && c.rx_len - off >= 4 {
                    let len_bytes: [u8; 4] = c.rx[off..off + 4].try_into().expect("4 bytes checked");
                    let flen = u32::from_be_bytes(len_bytes) as usize;
                    let avail = c.rx_len - off - 4;
                    if flen > max_frame {
                        // The length says where the next frame starts, so the stream
                        // stays in step: skip this one, now and in later reads.
                        let skip = flen.min(avail);
                        c.discard = flen - skip;
                        off += 4 + skip;
                        self.fab.count_cut(slot, 1, flen as u64);
                        continue;
                    }
                    if avail < flen {
                        break;
                    }
                    frames[k] = &c.rx[off + 4..off + 4 + flen];
                    k += 1;
                    off += 4 + flen;
                }
                self.fab.forward(slot, &frames[..k]);
                if k < BATCH {
                    break;
                }
            }
            c.rx.copy_within(off..c.rx_len, 0);
            c.rx_len -= off;
            if closed.is_some() {
                break;
            }
        }
        if let Some(reason) = closed {
            let _ = epoll::delete(&self.fab.epoll, &c.fd);
            self.fab.port_down(slot, reason);
            return;
        }
        if let Some(Port {
            kind: Kind::Stream { conn, .. },
            ..
        }) = self.fab.port_mut(slot)
        {
            *conn = Some(c);
        }
    }
}

impl Fabric {
    pub(super) fn accept(&mut self, slot: u32) {
        loop {
            let Some(port) = self.port(slot) else { return };
            let Kind::Stream { listener, conn } = &port.kind else {
                return;
            };
            let fd = match rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return,
                Err(e) => {
                    warn!(port = %port.id, "accept failed: {e}");
                    return;
                }
            };
            if conn.is_some() {
                warn!(port = %port.id, "refused a second connection: one VMM per stream port");
                continue;
            }
            transport::size_buffers(&fd, self.socket_buffer_bytes);
            let id = port.id;
            let max_frame = self.net(port.net).config.max_frame_len();
            if let Err(e) = epoll::add(
                &self.epoll,
                &fd,
                epoll::EventData::new_u64(token(slot, true)),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            ) {
                warn!(port = %id, "cannot watch the new connection: {e}");
                continue;
            }
            let c = StreamConn {
                fd,
                rx: vec![0; max_frame + 4 + STREAM_RX_SLACK],
                rx_len: 0,
                discard: 0,
                tx: Vec::with_capacity(64 << 10),
                tx_off: 0,
            };
            let port = self.port_mut(slot).expect("checked above");
            if let Kind::Stream { conn, .. } = &mut port.kind {
                *conn = Some(c);
            }
            port.out_armed = false;
            self.mark_up(slot, None);
        }
    }
}
