//! Receiving: a readable port gets a turn of up to `ROUNDS_PER_WAKE` receive calls,
//! each batch forwarded straight from the receive buffers; a stream port's listener
//! accepts its VMM instead.

use super::port_io::{frames_of, Trouble};
use super::*;
use crate::offload::PLAIN;

impl Worker {
    pub(super) fn readable(&mut self, slot: u32, conn: bool) {
        let Some(port) = self.fab.port(slot) else {
            return;
        };
        if !conn && port.io.listens() {
            self.fab.accept(slot);
            return;
        }
        let max_len = self.fab.net(port.net).config.max_frame_len();
        let mut reads_left = ROUNDS_PER_WAKE;
        let mut bytes = 0;
        loop {
            let Some(port) = self.fab.port_mut(slot) else {
                return;
            };
            let mut batch = port.io.recv(&mut self.rx, max_len, reads_left > 0);
            if batch.read {
                reads_left = reads_left.saturating_sub(1);
            }
            if let Some(peer) = batch.peer {
                self.fab.set_peer(slot, peer);
            }
            if let Some(peer) = batch.up.take() {
                self.fab.mark_up(slot, Some(peer));
            }
            self.fab.count_cut(slot, batch.cut, batch.cut_bytes);
            self.fab.count_drop(slot, DropReason::Malformed, batch.malformed);
            if batch.frames > 0 {
                let frames = frames_of(&self.rx, &batch);
                bytes += frames[..batch.frames].iter().map(|f| f.len()).sum::<usize>();
                if bytes >= TURN_BYTES {
                    reads_left = 0;
                }
                let offloads = if batch.offloaded { &self.rx.offloads } else { &PLAIN };
                self.fab
                    .forward(slot, &frames[..batch.frames], &offloads[..batch.frames]);
                if let Some(port) = self.fab.port_mut(slot) {
                    port.io.lend_back(&mut self.rx);
                }
            }
            match batch.trouble {
                Some(Trouble::Down(reason)) => {
                    self.fab.port_down(slot, reason);
                    return;
                }
                Some(Trouble::Warn(reason)) => {
                    warn!(port = %self.fab.port_id(slot), "{reason}");
                    return;
                }
                None if !batch.more => return,
                None => {}
            }
        }
    }
}

impl Fabric {
    pub(super) fn accept(&mut self, slot: u32) {
        let Some(port) = self.ports.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let max_frame = self.nets[port.net]
            .as_ref()
            .expect("a port's network exists while the port does")
            .config
            .max_frame_len();
        if port.io.accept(&self.epoll, slot, port.id, max_frame) {
            port.out_armed = false;
            self.mark_up(slot, None);
        }
    }
}
