//! Sending: a first attempt straight from the receive buffers, and the drain of a
//! port's backlog when it becomes writable; both judge failures by the one errno table
//! in `port_io`.

use super::port_io::SendFailure;
use super::*;
use crate::offload::PLAIN;

impl Fabric {
    /// Sends frames `idx` of a batch to port `d`: as they are to a port that takes
    /// offloads (or when all are plain), else segmented and checksummed first.
    pub(super) fn transmit(&mut self, d: u32, idx: &[u16], frames: &[&[u8]], offloads: &[Offload]) {
        let mut list: [&[u8]; BATCH] = [&[]; BATCH];
        let mut offl = [Offload::default(); BATCH];
        for ((slot, o), i) in list.iter_mut().zip(&mut offl).zip(idx) {
            *slot = frames[*i as usize];
            *o = offloads[*i as usize];
        }
        let (list, offl) = (&list[..idx.len()], &offl[..idx.len()]);
        let Some(port) = self.port(d) else { return };
        if port.io.takes_offloads() || offl.iter().all(Offload::is_plain) {
            self.transmit_list(d, list, offl);
            return;
        }
        let mut soft = mem::take(&mut self.soft);
        soft.clear();
        let mut drops = [0u64; DropReason::ALL.len()];
        for (f, o) in list.iter().zip(offl) {
            if let Err(reason) = soft.push(f, o) {
                drops[reason as usize] += 1;
            }
        }
        for (reason, n) in DropReason::ALL.iter().zip(drops) {
            self.count_drop(d, *reason, n);
        }
        for chunk in soft.frames().chunks(BATCH) {
            let mut list: [&[u8]; BATCH] = [&[]; BATCH];
            for (slot, f) in list.iter_mut().zip(chunk) {
                *slot = f;
            }
            self.transmit_list(d, &list[..chunk.len()], &PLAIN[..chunk.len()]);
        }
        self.soft = soft;
    }

    fn transmit_list(&mut self, d: u32, list: &[&[u8]], offl: &[Offload]) {
        let Some(port) = self.port(d) else { return };
        if !port.up {
            self.count_drop(d, DropReason::PeerGone, list.len() as u64);
            return;
        }
        if !port.backlog.is_empty() {
            self.enqueue(d, list, offl);
            return;
        }
        let mut off = 0;
        while off < list.len() {
            let Some(port) = self.ports[d as usize].as_mut() else {
                return;
            };
            match port.io.send(&list[off..], &offl[off..]) {
                Ok(k) => {
                    let bytes = list[off..off + k].iter().map(|f| f.len() as u64).sum();
                    port.shared.counters.add_tx(k as u64, bytes);
                    if let Some(net) = &self.nets[port.net] {
                        net.shared.counters.add_tx(k as u64, bytes);
                    }
                    off += k;
                }
                Err(e) => match port.io.send_failure(&e) {
                    SendFailure::Later => {
                        self.enqueue(d, &list[off..], &offl[off..]);
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
        if self.port(d).is_some_and(|p| p.io.pending_out()) {
            self.set_out_interest(d, true);
        }
    }

    /// Copies frames into the port's backlog (bounded) and asks for writability.
    pub(super) fn enqueue(&mut self, d: u32, frames: &[&[u8]], offloads: &[Offload]) {
        let cap = self.egress_queue_frames;
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let mut dropped = 0;
        for (f, o) in frames.iter().zip(offloads) {
            if port.backlog.len() >= cap {
                dropped += 1;
                continue;
            }
            let mut b = self.spare.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(f);
            port.backlog.push_back((b, *o));
        }
        self.count_drop(d, DropReason::QueueFull, dropped);
        self.set_out_interest(d, true);
    }

    pub(super) fn set_out_interest(&mut self, d: u32, want: bool) {
        let Some(port) = self.port(d) else { return };
        if port.out_armed == want {
            return;
        }
        let Some((fd, conn)) = port.io.writable_fd() else {
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
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        match port.io.flush() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.port_down(d, format!("send failed: {e}"));
                return;
            }
        }
        loop {
            let Some(port) = self.ports[d as usize].as_mut() else {
                return;
            };
            if port.backlog.is_empty() {
                break;
            }
            let mut list: [&[u8]; BATCH] = [&[]; BATCH];
            let mut offl = [Offload::default(); BATCH];
            for ((s, o), (f, fo)) in list.iter_mut().zip(&mut offl).zip(&port.backlog) {
                *s = f;
                *o = *fo;
            }
            let n = port.backlog.len().min(BATCH);
            match port.io.send(&list[..n], &offl[..n]) {
                Ok(k) => {
                    let mut bytes = 0;
                    for _ in 0..k {
                        let (buf, _) = port.backlog.pop_front().expect("k <= backlog length");
                        bytes += buf.len() as u64;
                        if self.spare.len() < SPARE_BUFFERS {
                            self.spare.push(buf);
                        }
                    }
                    port.shared.counters.add_tx(k as u64, bytes);
                    let net = port.net;
                    self.net(net).shared.counters.add_tx(k as u64, bytes);
                }
                Err(e) => match port.io.send_failure(&e) {
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
        let waiting = self.port(d).is_some_and(|p| p.io.pending_out());
        self.set_out_interest(d, waiting);
    }
}
