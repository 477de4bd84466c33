//! TAP ports: a frame per `read`/`write` (the TAP fd has no batch call), read until
//! EAGAIN or a batch is full.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;

use super::{Batch, Source, Trouble};
use crate::switch::worker::RxBuffers;
use crate::sys::mmsg::BATCH;

pub(in crate::switch::worker) struct Tap {
    fd: OwnedFd,
}

impl Tap {
    pub(super) fn new(fd: OwnedFd) -> Tap {
        Tap { fd }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_len: usize) -> Batch {
        let (mut n, mut cut, mut trouble) = (0, 0u64, None);
        let mut drained = false;
        while n < BATCH {
            // One more byte than allowed: a read that fills it was cut.
            match rustix::io::read(&self.fd, &mut rx.bufs[n][..max_len + 1]) {
                Ok(len) if len > max_len => cut += 1,
                Ok(len) => {
                    rx.meta[n].len = len;
                    n += 1;
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    trouble = Some(Trouble::Down(format!("TAP read failed: {e}")));
                    break;
                }
            }
        }
        Batch {
            source: Source::Bufs,
            frames: n,
            cut,
            cut_bytes: cut * (max_len as u64 + 1),
            peer: None,
            read: true,
            more: !drained && trouble.is_none(),
            trouble,
        }
    }

    pub(super) fn send(&mut self, frames: &[&[u8]]) -> io::Result<usize> {
        rustix::io::write(&self.fd, frames[0])
            .map(|_| 1)
            .map_err(io::Error::from)
    }
}
