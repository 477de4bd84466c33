//! In-process ports: frames pass between the switch thread and a port served by another
//! thread of this process (a vhost-user device's queue thread, the network's gateway)
//! through two bounded lock-free queues, with one wake-up per batch in each direction
//! (an eventfd towards the switch, a pipe towards the port) instead of a socket and a
//! system call per frame on each side.
//!
//! Frames travel as owned buffers; a shared pool returns them for reuse, so the steady
//! state allocates nothing. Each side, finding the other's queue full, raises a flag and
//! stops; the other side, having taken frames off that queue, sees the flag and wakes it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_queue::ArrayQueue;
use rustix::event::{eventfd, EventfdFlags};

use crate::error::{FabricError, Result};
use crate::offload::Offload;

/// Frames each queue holds; a guest's TX queue (256 descriptors by default) fits twice.
pub(crate) const RING_FRAMES: usize = 512;

/// A frame in a ring, with what its virtio-net header says (plain but for a guest
/// that negotiated offloads).
pub(crate) type RingFrame = (Vec<u8>, Offload);

/// The two queues between the switch and an in-process port, and their wake-ups.
pub(crate) struct FrameRing {
    /// Frames the port received, for the switch to forward.
    pub to_switch: ArrayQueue<RingFrame>,
    /// Frames the switch sends out through the port.
    pub to_port: ArrayQueue<RingFrame>,
    /// The port's peer takes frames as offloaded as they come (a guest that negotiated
    /// checksum and segmentation offloads); else the switch cuts them first.
    pub takes_offloads: AtomicBool,
    /// Spent buffers, for either side to fill again.
    free: ArrayQueue<Vec<u8>>,
    /// Readable when the switch has work: frames in `to_switch`, room in `to_port`, or
    /// the peer came or went. The switch thread polls it.
    switch_wake: OwnedFd,
    /// Readable when the port has work: frames in `to_port`, room in `to_switch`. A
    /// pipe (read end, write end), not an eventfd, so an async runtime can wait on it
    /// through its safe pipe type.
    port_wake: (OwnedFd, OwnedFd),
    /// The switch found `to_port` full and waits for room.
    switch_waits: AtomicBool,
    /// The port found `to_switch` full and waits for room.
    port_waits: AtomicBool,
    /// Bumped on every connect and disconnect of the peer, so the switch sees each.
    generation: AtomicU64,
    /// The peer, while one is connected: what `port ls` shows.
    peer: Mutex<Option<String>>,
    /// Set for a port whose own code runs on the switch's thread: the switch hands it
    /// what it sends, borrowed, instead of queueing a copy (see [`DirectSink`]).
    direct: std::sync::OnceLock<DirectSink>,
}

/// What takes a port's frames where the switch sends them, on the switch's thread,
/// borrowed for the call: a VXLAN tunnel (the switch thread serves the VTEP anyway), so
/// a 64 KiB segment is cut and sent from the buffer the switch read it into, not copied
/// into the port's queue first and sent a wake-up later. It takes every frame (what it
/// cannot send it counts as lost, as a datagram would be).
pub(crate) type DirectSink = Box<dyn Fn(&[&[u8]], &[Offload]) + Send + Sync>;

fn new_eventfd() -> Result<OwnedFd> {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| FabricError::io("create eventfd", e.into()))
}

fn signal(fd: &OwnedFd) {
    // A full counter (2^64 - 2 wake-ups unread) cannot happen: every wake-up drains it.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
}

impl FrameRing {
    pub(crate) fn new() -> Result<FrameRing> {
        Ok(FrameRing {
            to_switch: ArrayQueue::new(RING_FRAMES),
            to_port: ArrayQueue::new(RING_FRAMES),
            takes_offloads: AtomicBool::new(false),
            free: ArrayQueue::new(2 * RING_FRAMES),
            switch_wake: new_eventfd()?,
            port_wake: rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(|e| FabricError::io("create pipe", e.into()))?,
            switch_waits: AtomicBool::new(false),
            port_waits: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            peer: Mutex::new(None),
            direct: std::sync::OnceLock::new(),
        })
    }

    /// The port's [`DirectSink`], if it has one.
    pub(crate) fn direct(&self) -> Option<&DirectSink> {
        self.direct.get()
    }

    pub(crate) fn switch_fd(&self) -> BorrowedFd<'_> {
        self.switch_wake.as_fd()
    }

    pub(crate) fn port_fd(&self) -> BorrowedFd<'_> {
        self.port_wake.0.as_fd()
    }

    /// A buffer to fill with a frame: a spent one if any.
    pub(crate) fn buffer(&self) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Gives a spent buffer back (dropped when the pool is full).
    pub(crate) fn recycle(&self, b: Vec<u8>) {
        let _ = self.free.push(b);
    }

    /// The switch drains its wake-up before looking at the queues, so a wake-up that
    /// comes while it looks is not lost.
    pub(crate) fn switch_woken(&self) {
        drain(&self.switch_wake);
    }

    pub(crate) fn port_woken(&self) {
        let mut buf = [0u8; 256];
        while matches!(rustix::io::read(&self.port_wake.0, &mut buf), Ok(n) if n == buf.len()) {}
    }

    pub(crate) fn wake_switch(&self) {
        signal(&self.switch_wake);
    }

    pub(crate) fn wake_port(&self) {
        // A full pipe already holds a wake-up.
        let _ = rustix::io::write(&self.port_wake.1, &[1]);
    }

    /// Offers a frame to the port; gives it back when `to_port` is full, after asking
    /// the port to say when it has room.
    pub(crate) fn push_to_port(&self, frame: RingFrame) -> std::result::Result<(), RingFrame> {
        push(&self.to_port, &self.switch_waits, frame)
    }

    /// Offers a frame to the switch; see [`FrameRing::push_to_port`].
    pub(crate) fn push_to_switch(&self, frame: RingFrame) -> std::result::Result<(), RingFrame> {
        push(&self.to_switch, &self.port_waits, frame)
    }

    /// The port took frames off `to_port`: wake the switch if it waits for room.
    pub(crate) fn port_made_room(&self) {
        if self.switch_waits.swap(false, Ordering::SeqCst) {
            self.wake_switch();
        }
    }

    /// The switch took frames off `to_switch`: wake the port if it waits for room.
    pub(crate) fn switch_made_room(&self) {
        if self.port_waits.swap(false, Ordering::SeqCst) {
            self.wake_port();
        }
    }

    /// A peer connected (`Some`, described) or went away (`None`); the switch is woken
    /// to see it.
    pub(crate) fn set_peer(&self, peer: Option<String>) {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.wake_switch();
    }

    /// The connection count so far and the peer now.
    pub(crate) fn peer(&self) -> (u64, Option<String>) {
        let peer = self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (self.generation.load(Ordering::SeqCst), peer)
    }

    /// Throws away frames still queued towards the port (its peer went away); returns
    /// how many.
    pub(crate) fn discard_to_port(&self) -> u64 {
        let mut n = 0;
        while let Some((b, _)) = self.to_port.pop() {
            self.recycle(b);
            n += 1;
        }
        n
    }
}

/// Pushes onto a bounded queue; when full, raises `waits` (so the consumer wakes the
/// producer once it made room) and tries once more, as the consumer may have made room
/// between the failed push and the flag.
fn push(queue: &ArrayQueue<RingFrame>, waits: &AtomicBool, frame: RingFrame) -> std::result::Result<(), RingFrame> {
    queue.push(frame).or_else(|frame| {
        waits.store(true, Ordering::SeqCst);
        queue.push(frame)
    })
}

/// A plain frame from this end: the gateway's, whose frames are checksummed by its own
/// code, so a receiver that takes virtio-net headers is told not to verify them.
const VOUCHED: Offload = Offload {
    csum: None,
    gso: None,
    data_valid: true,
};

/// The far end of an in-process port ([`crate::Switch::add_inprocess_port`]), for a
/// service in this process (the network's gateway): frames in and out without a
/// socket, the switch woken by an eventfd write per frame sent (or per batch, with
/// [`InProcessEnd::send_batch`]).
pub struct InProcessEnd {
    ring: std::sync::Arc<FrameRing>,
}

/// The switch's queue towards it was full: the frame was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl InProcessEnd {
    pub(crate) fn new(ring: std::sync::Arc<FrameRing>) -> InProcessEnd {
        InProcessEnd { ring }
    }

    /// The read end of the port's wake-up pipe (a duplicate): readable when frames
    /// wait or room was made. Drain it before looking at the queue, not after.
    pub fn wake_receiver(&self) -> std::io::Result<OwnedFd> {
        self.ring.port_fd().try_clone_to_owned()
    }

    /// The next frame the switch sent, if any; give it back with [`InProcessEnd::recycle`].
    /// Plain unless this end said it takes offloads.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.try_recv_offloaded().map(|(f, _)| f)
    }

    /// Says this end takes frames as offloaded as they come (checksums left partial,
    /// segments of up to 64 KiB), so the switch does not complete or cut them first.
    pub fn take_offloads(&self) {
        self.ring
            .takes_offloads
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next frame the switch sent, with what its virtio-net header says (see
    /// [`InProcessEnd::take_offloads`]).
    pub fn try_recv_offloaded(&self) -> Option<(Vec<u8>, Offload)> {
        let frame = self.ring.to_port.pop()?;
        self.ring.port_made_room();
        Some(frame)
    }

    pub fn recycle(&self, frame: Vec<u8>) {
        self.ring.recycle(frame);
    }

    /// From now on the switch hands what it sends through this port to `sink`, on its
    /// own thread, instead of queueing it (for a port served by the switch's thread;
    /// set once, later calls are ignored).
    pub(crate) fn send_directly(&self, sink: DirectSink) {
        let _ = self.ring.direct.set(sink);
    }

    /// An empty buffer, a spent one if the pool has any (frames given to the switch
    /// come back to the pool once sent).
    pub fn buffer(&self) -> Vec<u8> {
        self.ring.buffer()
    }

    /// Queues a copy of `frame` for the switch and wakes it.
    pub fn try_send(&self, frame: &[u8]) -> Result<(), Full> {
        self.send_batch(std::iter::once(frame)).map(|_| ())
    }

    /// Queues copies of `frames` and wakes the switch once; stops at the first that
    /// does not fit and returns how many went.
    pub fn send_batch<'a>(&self, frames: impl IntoIterator<Item = &'a [u8]>) -> Result<usize, Full> {
        let mut sent = 0;
        let mut full = false;
        for f in frames {
            let mut b = self.ring.buffer();
            b.extend_from_slice(f);
            if let Err((b, _)) = self.ring.push_to_switch((b, VOUCHED)) {
                self.ring.recycle(b);
                full = true;
                break;
            }
            sent += 1;
        }
        self.sent(sent, full)
    }

    /// Moves frames from the front of `frames` into the switch's queue, without a copy,
    /// each with what its virtio-net header is to say (a frame the sender left
    /// checksums or segmentation to, see [`Offload::defer_tcp_checksum`]); wakes the
    /// switch once, stops at the first that does not fit and returns how many went.
    /// Plain frames go vouched for: this end made their checksums.
    pub fn send_owned(&self, frames: &mut std::collections::VecDeque<(Vec<u8>, Offload)>) -> Result<usize, Full> {
        self.send_owned_as(frames, VOUCHED)
    }

    /// [`Self::send_owned`] for frames this end only relays (a tunnel's, from another
    /// host): plain ones go as they came, for their receiver to verify.
    pub fn relay_owned(&self, frames: &mut std::collections::VecDeque<(Vec<u8>, Offload)>) -> Result<usize, Full> {
        self.send_owned_as(frames, Offload::default())
    }

    fn send_owned_as(
        &self,
        frames: &mut std::collections::VecDeque<(Vec<u8>, Offload)>,
        plain: Offload,
    ) -> Result<usize, Full> {
        let mut sent = 0;
        let mut full = false;
        while let Some((frame, offload)) = frames.pop_front() {
            let offload = if offload.is_plain() { plain } else { offload };
            if let Err(back) = self.ring.push_to_switch((frame, offload)) {
                frames.push_front(back);
                full = true;
                break;
            }
            sent += 1;
        }
        self.sent(sent, full)
    }

    fn sent(&self, sent: usize, full: bool) -> Result<usize, Full> {
        if sent > 0 {
            self.ring.wake_switch();
        }
        match (sent, full) {
            (0, true) => Err(Full),
            _ => Ok(sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_gives_the_frame_back_and_the_consumer_wakes_the_producer() {
        let r = FrameRing::new().unwrap();
        for i in 0..RING_FRAMES {
            r.push_to_port((vec![i as u8], Offload::default())).unwrap();
        }
        let back = r.push_to_port((vec![0xee], Offload::default())).unwrap_err();
        assert_eq!(back.0, vec![0xee]);
        // Nothing woke the switch yet.
        let mut buf = [0u8; 8];
        assert!(rustix::io::read(&r.switch_wake, &mut buf).is_err());
        let (f, _) = r.to_port.pop().unwrap();
        r.recycle(f);
        r.port_made_room();
        assert!(rustix::io::read(&r.switch_wake, &mut buf).is_ok(), "woken for room");
        r.push_to_port(back).unwrap();
        // A spent buffer comes back empty.
        assert!(r.buffer().is_empty());
    }

    #[test]
    fn only_frames_this_end_made_are_vouched_for() {
        let end = InProcessEnd::new(std::sync::Arc::new(FrameRing::new().unwrap()));
        let plain = || std::collections::VecDeque::from([(vec![1u8; 60], Offload::default())]);
        end.send_owned(&mut plain()).unwrap();
        end.relay_owned(&mut plain()).unwrap();
        let made = end.ring.to_switch.pop().unwrap().1;
        let relayed = end.ring.to_switch.pop().unwrap().1;
        assert!(made.data_valid, "the gateway's own frame");
        assert!(
            !relayed.data_valid,
            "a tunnel's frame is left to its receiver to verify"
        );
    }

    #[test]
    fn peers_coming_and_going_are_counted() {
        let r = FrameRing::new().unwrap();
        assert_eq!(r.peer(), (0, None));
        r.set_peer(Some("qemu".into()));
        r.set_peer(None);
        assert_eq!(r.peer(), (2, None));
    }
}
