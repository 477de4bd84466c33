//! Datagram ports: a socketpair end (the peer fixed) or a bound path (the peer is
//! whoever sends to it). A batch moves in one `recvmmsg`/`sendmmsg`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll;

use super::{Batch, Source, Trouble};
use crate::switch::worker::{token, RxBuffers};
use crate::sys::mmsg::{recv_batch, send_batch, UnixPeer, BATCH};

pub(in crate::switch::worker) struct Datagram {
    sock: OwnedFd,
    peer: Peer,
}

enum Peer {
    /// A socketpair: the kernel knows the peer.
    Fixed,
    /// A bound path: the last named sender, if any yet.
    Learned(Option<UnixPeer>),
}

/// The errors after which a datagram socket has no one to talk to.
fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ENOENT
                | libc::EPIPE
                | libc::ECONNRESET
                | libc::ENOTCONN
                | libc::EBADFD
                | libc::EIO
        )
    )
}

impl Datagram {
    pub(super) fn connected(sock: OwnedFd) -> Datagram {
        Datagram {
            sock,
            peer: Peer::Fixed,
        }
    }

    pub(super) fn path(sock: OwnedFd) -> Datagram {
        Datagram {
            sock,
            peer: Peer::Learned(None),
        }
    }

    pub(super) fn peer_fixed(&self) -> bool {
        matches!(self.peer, Peer::Fixed)
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// One `recvmmsg`. Frames the kernel cut (longer than `max_len`) are counted and
    /// left out: the good ones are moved to the front of the buffers.
    pub(super) fn recv(&mut self, rx: &mut RxBuffers, max_len: usize) -> Batch {
        let learn = matches!(self.peer, Peer::Learned(_));
        let peers = if learn { Some(&mut *rx.peers) } else { None };
        let n = match recv_batch(self.sock.as_fd(), &mut rx.bufs, max_len, &mut rx.meta, peers) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Batch::nothing(true, true),
            Err(e) => {
                let mut b = Batch::nothing(true, false);
                b.trouble = Some(if is_peer_gone(&e) {
                    Trouble::Down(format!("receive failed: {e}"))
                } else {
                    Trouble::Warn(format!("receive failed: {e}"))
                });
                return b;
            }
        };
        let peer = if learn {
            rx.peers[..n].iter().rev().find(|p| p.is_named()).copied()
        } else {
            None
        };
        let (mut kept, mut cut, mut cut_bytes) = (0, 0u64, 0u64);
        for i in 0..n {
            if rx.meta[i].truncated {
                cut += 1;
                cut_bytes += rx.meta[i].len as u64;
                continue;
            }
            if i != kept {
                rx.bufs.swap(i, kept);
                rx.meta.swap(i, kept);
            }
            kept += 1;
        }
        Batch {
            source: Source::Bufs,
            frames: kept,
            cut,
            cut_bytes,
            offloaded: false,
            malformed: 0,
            peer,
            up: None,
            read: true,
            more: n == BATCH,
            trouble: None,
        }
    }

    pub(super) fn send(&mut self, frames: &[&[u8]]) -> io::Result<usize> {
        match &self.peer {
            Peer::Fixed => send_batch(self.sock.as_fd(), frames, None),
            Peer::Learned(Some(p)) => send_batch(self.sock.as_fd(), frames, Some(p)),
            Peer::Learned(None) => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
        }
    }

    pub(super) fn set_peer(&mut self, peer: UnixPeer) -> bool {
        match &mut self.peer {
            Peer::Learned(current) if current.as_ref() != Some(&peer) => {
                *current = Some(peer);
                true
            }
            Peer::Learned(_) | Peer::Fixed => false,
        }
    }

    /// A socketpair whose peer is gone is never polled again; a path forgets its
    /// peer and keeps listening for the next one (without asking for writability).
    pub(super) fn down(&mut self, epoll: &OwnedFd, slot: u32, out_armed: bool) {
        match &mut self.peer {
            Peer::Fixed => {
                let _ = epoll::delete(epoll, &self.sock);
            }
            Peer::Learned(current) => {
                *current = None;
                if out_armed {
                    let _ = epoll::modify(
                        epoll,
                        &self.sock,
                        epoll::EventData::new_u64(token(slot, false)),
                        epoll::EventFlags::IN,
                    );
                }
            }
        }
    }
}
