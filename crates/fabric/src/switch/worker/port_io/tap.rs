//! TAP ports: a frame per `read`/`write` (the TAP fd has no batch call), read until
//! EAGAIN or a batch is full. A TAP with a virtio-net header hands over TCP segments of
//! up to 64 KiB with checksums left partial, and takes them the same way: one system
//! call moves what would be some 45 frames at MTU 1500.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;

use super::{Batch, Source, Trouble};
use crate::offload::{Offload, VNET_HDR_LEN};
use crate::switch::worker::RxBuffers;
use crate::sys::mmsg::BATCH;

/// Segments a batch of offloaded frames may stand for before the read stops: what a
/// destination without offloads (the gateway's queues, a socket) can take at once.
const SEGMENTS_PER_BATCH: usize = 256;

pub(in crate::switch::worker) struct Tap {
    fd: OwnedFd,
    /// The length of the virtio-net header each frame carries (10 or 12), if any.
    vnet_hdr: Option<usize>,
}

impl Tap {
    pub(super) fn new(fd: OwnedFd, vnet_hdr: Option<usize>) -> Tap {
        Tap { fd, vnet_hdr }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(super) fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr.is_some()
    }

    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_len: usize) -> Batch {
        let mut batch = Batch::nothing(true, true);
        batch.source = Source::Bufs;
        batch.offloaded = self.vnet_hdr.is_some();
        let mut segments = 0;
        let mut drained = false;
        while batch.frames < BATCH && segments < SEGMENTS_PER_BATCH {
            let n = batch.frames;
            let buf = &mut rx.bufs[n];
            let mut hdr = [0u8; 12];
            let hdr_len = self.vnet_hdr.unwrap_or(0);
            // With offloads a frame may be a 64 KiB segment; the MTU applies to the
            // segments it stands for, checked when it is forwarded.
            let limit = if hdr_len > 0 { buf.len() - 1 } else { max_len };
            let got = if hdr_len > 0 {
                let mut iov = [
                    IoSliceMut::new(&mut hdr[..hdr_len]),
                    IoSliceMut::new(&mut buf[..limit + 1]),
                ];
                rustix::io::readv(&self.fd, &mut iov).map(|len| len.saturating_sub(hdr_len))
            } else {
                // One more byte than allowed: a read that fills it was cut.
                rustix::io::read(&self.fd, &mut buf[..limit + 1])
            };
            match got {
                Ok(len) if len > limit => {
                    batch.cut += 1;
                    batch.cut_bytes += len as u64;
                }
                Ok(len) if hdr_len > 0 => match Offload::from_vnet_hdr(&hdr[..hdr_len]) {
                    Ok(off) => {
                        segments += off.gso.map_or(1, |g| len / usize::from(g.size.max(1)) + 1);
                        rx.offloads[n] = off;
                        rx.meta[n].len = len;
                        batch.frames += 1;
                    }
                    Err(_) => batch.malformed += 1,
                },
                Ok(len) => {
                    segments += 1;
                    rx.meta[n].len = len;
                    batch.frames += 1;
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    batch.trouble = Some(Trouble::Down(format!("TAP read failed: {e}")));
                    break;
                }
            }
        }
        batch.more = !drained && batch.trouble.is_none();
        batch
    }

    pub(super) fn send(&mut self, frames: &[&[u8]], offloads: &[Offload]) -> io::Result<usize> {
        let Some(hdr_len) = self.vnet_hdr else {
            return rustix::io::write(&self.fd, frames[0])
                .map(|_| 1)
                .map_err(io::Error::from);
        };
        let mut hdr = [0u8; 12];
        hdr[..VNET_HDR_LEN].copy_from_slice(&offloads[0].to_vnet_hdr());
        rustix::io::writev(&self.fd, &[IoSlice::new(&hdr[..hdr_len]), IoSlice::new(frames[0])])
            .map(|_| 1)
            .map_err(io::Error::from)
    }
}
