//! In-process ports (see `crate::ring`): a batch is whatever the port's thread queued,
//! taken without a system call apart from draining the wake-up; frames go out by
//! queueing copies and one wake-up per batch, or, to a port whose code the switch's
//! thread runs, handed to it borrowed.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Batch, Source, Trouble};
use crate::config::MAX_RX_FRAME_LEN;
use crate::offload::Offload;
use crate::ring::FrameRing;
use crate::switch::worker::RxBuffers;
use crate::sys::mmsg::BATCH;

pub(in crate::switch::worker) struct Ring {
    ring: Arc<FrameRing>,
    /// The peer generation last seen (see `FrameRing::peer`).
    seen: u64,
}

impl Ring {
    pub(super) fn new(ring: Arc<FrameRing>) -> Ring {
        Ring { ring, seen: 0 }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.ring.switch_fd()
    }

    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_len: usize) -> Batch {
        self.ring.switch_woken();
        let mut batch = Batch::nothing(true, false);
        let (generation, peer) = self.ring.peer();
        if generation != self.seen {
            self.seen = generation;
            match peer {
                Some(p) => batch.up = Some(p),
                None => {
                    batch.trouble = Some(Trouble::Down("the VMM disconnected".into()));
                    return batch;
                }
            }
        }
        batch.source = Source::Owned;
        batch.offloaded = true;
        while rx.owned.len() < BATCH {
            let Some((frame, offload)) = self.ring.to_switch.pop() else {
                break;
            };
            // A segment offload may exceed the MTU; its segments are checked later.
            let limit = if offload.gso.is_some() {
                MAX_RX_FRAME_LEN
            } else {
                max_len
            };
            if frame.len() > limit {
                batch.cut += 1;
                batch.cut_bytes += frame.len() as u64;
                self.ring.recycle(frame);
                continue;
            }
            rx.offloads[rx.owned.len()] = offload;
            rx.owned.push(frame);
        }
        batch.frames = rx.owned.len();
        self.ring.switch_made_room();
        batch.more = !self.ring.to_switch.is_empty();
        batch
    }

    /// The batch is forwarded: its buffers go back to the pool.
    pub(super) fn lend_back(&mut self, rx: &mut RxBuffers) {
        for b in rx.owned.drain(..) {
            self.ring.recycle(b);
        }
    }

    /// The peer takes offloaded frames (read each time: a guest negotiates anew on
    /// every connection).
    pub(super) fn takes_offloads(&self) -> bool {
        self.ring.takes_offloads.load(Ordering::Relaxed)
    }

    pub(super) fn send(&mut self, frames: &[&[u8]], offloads: &[Offload]) -> io::Result<usize> {
        if let Some(sink) = self.ring.direct() {
            sink(frames, offloads);
            return Ok(frames.len());
        }
        let mut sent = 0;
        for (f, o) in frames.iter().zip(offloads) {
            let mut b = self.ring.buffer();
            b.extend_from_slice(f);
            if let Err((b, _)) = self.ring.push_to_port((b, *o)) {
                self.ring.recycle(b);
                break;
            }
            sent += 1;
        }
        if sent > 0 {
            self.ring.wake_port();
        }
        Ok(sent)
    }

    /// The peer is gone: what waited for it is dropped (counted by the caller as the
    /// port's backlog is); the ring stays watched for the next VMM.
    pub(super) fn down(&mut self) -> u64 {
        self.ring.discard_to_port()
    }
}
