//! The virtio-net device a vhost-user port presents: its features, and the queue
//! thread's work of moving frames between the guest's virtqueues (in its shared memory)
//! and the port's ring to the switch.
//!
//! Queue 0 is the guest's receive queue, queue 1 its transmit queue. Every frame carries
//! a `virtio_net_hdr` in front: 12 bytes with VIRTIO_F_VERSION_1 (or mergeable receive
//! buffers), 10 for a legacy device (QEMU's virtio-mmio is legacy by default). Guest
//! input is not trusted: descriptor chains are checked by `virtio-queue` against the
//! guest's memory map; a chain that points outside it, or is too short for a header,
//! is returned to the guest unused and counted.
//!
//! Offloads: the device offers checksum and TCP segmentation offload both ways and
//! mergeable receive buffers. A guest's 64 KiB segment goes to the switch as one frame
//! with what its header said; the switch hands this port offloaded frames only when
//! the guest took all of the guest-side offloads (else it cuts them first), and a large
//! frame is spread over as many receive buffers as it needs.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::config::MAX_RX_FRAME_LEN;
use crate::counters::DropReason;
use crate::offload::{Offload, VNET_HDR_LEN};
use crate::ring::{FrameRing, RingFrame};
use crate::switch::DropCounters;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub(crate) const NET_HDR_LEN: usize = 12;
/// The legacy header, without num_buffers.
const LEGACY_HDR_LEN: usize = 10;
/// Queue pairs a VMM may ask for (VIRTIO_NET_F_MQ): one per guest vCPU transmits
/// without a lock in the guest. Queue 2i receives, 2i+1 transmits.
pub const MAX_QUEUE_PAIRS: usize = 4;
const QUEUES: usize = 2 * MAX_QUEUE_PAIRS;
/// The event id of the ring's wake-up in the queue thread's epoll (ids up to `QUEUES`
/// belong to the library).
pub(crate) const RING_EVENT: u16 = QUEUES as u16 + 1;
const MAX_QUEUE_SIZE: usize = 1024;
/// Receive buffers one frame may take with mergeable buffers: a 64 KiB segment in
/// the smallest buffers Linux posts (1.5 KiB) takes 44.
const MAX_BUFFERS_PER_FRAME: usize = 64;

/// What the guest sends: checksums left partial and segments up to 64 KiB.
const HOST_OFFLOADS: u64 =
    1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_HOST_ECN;
/// What the guest takes; all of them, or the switch cuts its frames first.
const GUEST_OFFLOADS: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

pub(crate) struct NetDevice {
    ring: Arc<FrameRing>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// The header length the negotiated features give.
    hdr_len: usize,
    /// A frame may span several receive buffers (`num_buffers` in its header).
    mergeable: bool,
    /// The guest took VIRTIO_NET_F_GUEST_CSUM: without it the header's flags stay zero.
    guest_csum: bool,
    /// A frame taken off the ring that waits for the guest to offer receive buffers.
    held: Option<RingFrame>,
    /// The guest's transmit queue was left with frames because the ring was full.
    tx_stalled: bool,
    counters: Arc<DropCounters>,
}

impl NetDevice {
    pub(crate) fn new(ring: Arc<FrameRing>, counters: Arc<DropCounters>) -> NetDevice {
        // Until this connection's guest says otherwise.
        ring.takes_offloads.store(false, std::sync::atomic::Ordering::Relaxed);
        NetDevice {
            ring,
            mem: None,
            hdr_len: NET_HDR_LEN,
            mergeable: false,
            guest_csum: false,
            held: None,
            tx_stalled: false,
            counters,
        }
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.mem.as_ref().map(|m| m.memory())
    }

    /// Tells the guest about used buffers, unless it asked not to be told yet.
    fn notify(vring: &VringRwLock) {
        if vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }

    /// Moves the guest's transmitted frames to the ring until either runs out.
    fn transmit(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else { return };
        let mut used = 0;
        let mut queued = 0;
        // No kicks while the queue is drained: the guest saves an exit per frame.
        let _ = vring.disable_notification();
        // One more look after re-arming kicks, not a loop: a queue the VMM has
        // stopped (not ready) says it has entries but yields none.
        let mut rechecked = false;
        loop {
            if self.ring.to_switch.is_full() {
                // Leave the rest in the guest's queue: it is the backpressure (the
                // switch wakes this thread when it has made room).
                self.tx_stalled = true;
                break;
            }
            let chain = {
                let mut state = vring.get_mut();
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    // Kicks on again, then one more look for what came meanwhile.
                    if !rechecked && state.get_queue_mut().enable_notification(&*mem).unwrap_or(false) {
                        rechecked = true;
                        continue;
                    }
                    break;
                };
                rechecked = false;
                chain
            };
            let head = chain.head_index();
            match self.read_frame(&mem, chain) {
                Some(frame) => {
                    if let Err((frame, _)) = self.ring.push_to_switch(frame) {
                        self.ring.recycle(frame);
                    } else {
                        queued += 1;
                    }
                }
                None => self.counters.add(DropReason::Malformed),
            }
            let _ = vring.add_used(head, 0);
            used += 1;
        }
        if used > 0 {
            Self::notify(vring);
        }
        if queued > 0 {
            self.ring.wake_switch();
        }
    }

    /// A transmitted chain's frame, without its header, and what the header says. A
    /// frame longer than any port may send is cut one byte past the limit, so the
    /// switch counts it as oversize.
    fn read_frame(
        &self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>,
    ) -> Option<RingFrame> {
        let mut reader = chain.reader(mem).ok()?;
        let total = reader.available_bytes();
        if total < self.hdr_len {
            return None;
        }
        let mut hdr = [0u8; NET_HDR_LEN];
        reader.read_exact(&mut hdr[..self.hdr_len]).ok()?;
        let offload = Offload::from_vnet_hdr(&hdr).ok()?;
        let len = (total - self.hdr_len).min(MAX_RX_FRAME_LEN + 1);
        let mut frame = self.ring.buffer();
        frame.resize(len, 0);
        reader.read_exact(&mut frame).ok()?;
        Some((frame, offload))
    }

    /// Fills the guest's receive buffers with frames from the ring until either runs out.
    fn receive(&mut self, vring: &VringRwLock) {
        let Some(mem) = self.memory() else { return };
        let mut used = 0;
        let mut took = false;
        // The buffers one frame goes into: (chain head, its writer).
        let mut buffers = Vec::new();
        while let Some((frame, offload)) = self.held.take().or_else(|| self.ring.to_port.pop()) {
            took = true;
            let need = self.hdr_len + frame.len();
            let (mut room, mut ran_out, mut bad) = (0, false, false);
            buffers.clear();
            while room < need && (buffers.is_empty() || self.mergeable) && buffers.len() < MAX_BUFFERS_PER_FRAME {
                let chain = {
                    let mut state = vring.get_mut();
                    state.get_queue_mut().pop_descriptor_chain(mem.clone())
                };
                let Some(chain) = chain else {
                    ran_out = true;
                    break;
                };
                let head = chain.head_index();
                match chain.writer(&mem) {
                    Ok(w) => {
                        room += w.available_bytes();
                        buffers.push((head, w));
                    }
                    Err(_) => {
                        // Returned unused; the frame is dropped with it, so no buffer
                        // ahead of it has to be given back to the queue.
                        let _ = vring.add_used(head, 0);
                        used += 1;
                        bad = true;
                        break;
                    }
                }
            }
            if ran_out && !bad {
                // Not enough buffers yet: give back the ones taken and keep the frame
                // until the guest offers more (its kick).
                let mut state = vring.get_mut();
                for _ in 0..buffers.len() {
                    state.get_queue_mut().go_to_previous_position();
                }
                drop(state);
                buffers.clear();
                self.held = Some((frame, offload));
                break;
            }
            let drop_reason = if bad {
                Some(DropReason::Malformed)
            } else if room < need {
                Some(DropReason::Oversize)
            } else {
                None
            };
            let mut hdr = [0u8; NET_HDR_LEN];
            let offload = Offload {
                data_valid: offload.data_valid && self.guest_csum,
                ..offload
            };
            hdr[..VNET_HDR_LEN].copy_from_slice(&offload.to_vnet_hdr());
            // num_buffers, where the header has it.
            hdr[10..12].copy_from_slice(&(buffers.len() as u16).to_le_bytes());
            let mut rest = [&hdr[..self.hdr_len], &frame[..]];
            let mut failed = false;
            for (head, mut w) in buffers.drain(..) {
                let mut written = 0;
                if drop_reason.is_none() {
                    for part in rest.iter_mut() {
                        let n = part.len().min(w.available_bytes());
                        failed |= w.write_all(&part[..n]).is_err();
                        *part = &part[n..];
                        written += n;
                    }
                }
                let _ = vring.add_used(head, written as u32);
                used += 1;
            }
            if let Some(reason) = drop_reason {
                self.counters.add(reason);
            } else if failed {
                self.counters.add(DropReason::Malformed);
            }
            self.ring.recycle(frame);
        }
        if used > 0 {
            Self::notify(vring);
        }
        if took {
            self.ring.port_made_room();
        }
    }
}

impl VhostUserBackendMut for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // Not VIRTIO_RING_F_EVENT_IDX: with it, DPDK's virtio-user (the benchmark's
        // frontend) stalled after its first bursts; the NO_NOTIFY flag suppresses
        // kicks while a queue is drained instead.
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_NOTIFY_ON_EMPTY
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MQ
            | HOST_OFFLOADS
            | GUEST_OFFLOADS
            | super::relay::PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // MQ: the VMM asks how many queues there are (GET_QUEUE_NUM).
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
    }

    fn acked_features(&mut self, features: u64) {
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.guest_csum = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        self.hdr_len = if features & (1 << VIRTIO_F_VERSION_1) != 0 || self.mergeable {
            NET_HDR_LEN
        } else {
            LEGACY_HDR_LEN
        };
        let takes = features & GUEST_OFFLOADS == GUEST_OFFLOADS;
        self.ring
            .takes_offloads
            .store(takes, std::sync::atomic::Ordering::Relaxed);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // Not offered (see `features`).
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread serves every queue of the port: they all meet in one ring anyway.
        vec![(1 << QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // Frames for the guest go to the first receive queue, which a guest always
        // has; a guest that spreads its transmissions over several pairs is served on
        // whichever queue it kicked.
        let Some(rx) = vrings.first() else {
            return Ok(());
        };
        match device_event {
            0 => self.receive(rx),
            q if usize::from(q) < vrings.len() && q % 2 == 1 => self.transmit(&vrings[usize::from(q)]),
            RING_EVENT => {
                self.ring.port_woken();
                self.receive(rx);
                if std::mem::take(&mut self.tx_stalled) {
                    for tx in vrings.iter().skip(1).step_by(2).filter(|v| v.get_ref().is_enabled()) {
                        self.transmit(tx);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Registers the ring's wake-up with the daemon's queue thread.
pub(crate) fn watch_ring(daemon: &Daemon, ring: &FrameRing) -> std::io::Result<()> {
    for handler in daemon.get_epoll_handlers() {
        handler.register_listener(ring.port_fd().as_raw_fd(), EventSet::IN, u64::from(RING_EVENT))?;
    }
    Ok(())
}

/// Ends the daemon's queue thread (its connection is over).
pub(crate) fn stop_queue_thread(daemon: &Daemon) {
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
}

pub(crate) type Daemon = vhost_user_backend::VhostUserDaemon<Arc<std::sync::Mutex<NetDevice>>>;

#[cfg(test)]
mod tests {
    //! The device against virtqueues laid out in memory as a guest's driver would:
    //! frames spread over mergeable buffers, buffers given back when too few, and
    //! transmitted chains that lie about where they are.
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::offload::{Gso, GsoKind, PartialCsum};

    const QSIZE: u16 = 16;
    /// Where buffers live: past the queue structures the mock writes from address 0.
    const BUFS: u64 = 0x10_0000;
    const GUEST_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | GUEST_OFFLOADS | HOST_OFFLOADS;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: NetDevice,
        ring: Arc<FrameRing>,
        counters: Arc<DropCounters>,
    }

    fn rig(features: u64) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let ring = Arc::new(FrameRing::new().unwrap());
        let counters = Arc::new(DropCounters {
            port: Arc::default(),
            net: Arc::default(),
        });
        let mut dev = NetDevice::new(ring.clone(), counters.clone());
        dev.update_memory(GuestMemoryAtomic::new(mem.clone())).unwrap();
        dev.acked_features(features);
        Rig {
            mem,
            dev,
            ring,
            counters,
        }
    }

    fn vring(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> VringRwLock {
        let v = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QSIZE).unwrap();
        v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        v.set_queue_size(QSIZE);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Single-descriptor chains at `BUFS + i * 4 KiB`, each `len` bytes.
    fn chains(n: u16, first: u16, len: u32, flags: u32) -> Vec<RawDescriptor> {
        (first..first + n)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(BUFS + u64::from(i) * 0x1000, len, flags as u16, 0)))
            .collect()
    }

    fn used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<u32> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| vq.used().ring().ref_at(usize::from(i)).unwrap().load().len())
            .collect()
    }

    fn gso_frame(len: usize) -> RingFrame {
        let frame: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let offload = Offload {
            csum: Some(PartialCsum { start: 34, offset: 16 }),
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                size: 1448,
                ecn: false,
                hdr_len: 54,
            }),
            data_valid: false,
        };
        (frame, offload)
    }

    #[test]
    fn a_large_frame_spreads_over_mergeable_buffers_and_waits_when_too_few() {
        let r = rig(GUEST_FEATURES);
        assert!(r.ring.takes_offloads.load(std::sync::atomic::Ordering::Relaxed));
        let vq = MockSplitQueue::new(&r.mem, QSIZE);
        vq.add_desc_chains(&chains(2, 0, 1024, VRING_DESC_F_WRITE), 0).unwrap();
        let rx = vring(&r.mem, &vq);
        let mut dev = r.dev;
        let (frame, offload) = gso_frame(2500);
        r.ring.to_port.push((frame.clone(), offload)).unwrap();
        dev.receive(&rx);
        assert!(
            used(&vq).is_empty(),
            "two 1 KiB buffers cannot hold 2,512 bytes: none used"
        );
        assert!(dev.held.is_some(), "the frame waits for more buffers");

        vq.add_desc_chains(&chains(1, 2, 1024, VRING_DESC_F_WRITE), 2).unwrap();
        dev.receive(&rx);
        assert_eq!(
            used(&vq),
            [1024, 1024, 12 + 2500 - 2048],
            "the same two buffers, then a third"
        );
        let mut got = vec![0u8; 3 * 1024];
        for i in 0..3u64 {
            r.mem
                .read_slice(
                    &mut got[i as usize * 1024..(i as usize + 1) * 1024],
                    GuestAddress(BUFS + i * 0x1000),
                )
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(
            Offload::from_vnet_hdr(&got[..10]),
            Ok(offload),
            "the header says what the frame is"
        );
        assert_eq!(&got[12..12 + 2500], &frame[..]);
        assert_eq!(r.counters.port.counters.snapshot().total_drops(), 0);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_needs_one_buffer_and_is_dropped_if_none_fits() {
        let r = rig(1 << VIRTIO_F_VERSION_1);
        assert!(!r.ring.takes_offloads.load(std::sync::atomic::Ordering::Relaxed));
        let vq = MockSplitQueue::new(&r.mem, QSIZE);
        vq.add_desc_chains(&chains(2, 0, 1024, VRING_DESC_F_WRITE), 0).unwrap();
        let rx = vring(&r.mem, &vq);
        let mut dev = r.dev;
        r.ring.to_port.push(gso_frame(2500)).unwrap();
        r.ring.to_port.push((vec![7u8; 100], Offload::default())).unwrap();
        dev.receive(&rx);
        assert_eq!(
            used(&vq),
            [0, 112],
            "the big frame given back unused, the small one delivered"
        );
        assert_eq!(r.counters.port.counters.snapshot().drops(DropReason::Oversize), 1);
    }

    #[test]
    fn transmitted_chains_outside_memory_or_too_short_are_counted_and_returned() {
        let r = rig(GUEST_FEATURES);
        let vq = MockSplitQueue::new(&r.mem, QSIZE);
        // A good frame with a GSO header, a chain pointing past the guest's memory, a
        // chain shorter than the header.
        let mut hdr = [0u8; 12];
        let (_, offload) = gso_frame(0);
        hdr[..10].copy_from_slice(&offload.to_vnet_hdr());
        r.mem.write_slice(&hdr, GuestAddress(BUFS)).unwrap();
        r.mem.write_slice(&[0xab; 60], GuestAddress(BUFS + 12)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(BUFS, 72, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x1000_0000, 72, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(BUFS + 0x1000, 4, 0, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let tx = vring(&r.mem, &vq);
        let mut dev = r.dev;
        dev.transmit(&tx);
        assert_eq!(used(&vq).len(), 3, "every chain goes back to the guest");
        let (frame, got) = r.ring.to_switch.pop().expect("the good frame reached the ring");
        assert_eq!((frame, got), (vec![0xab; 60], offload));
        assert!(r.ring.to_switch.pop().is_none());
        assert_eq!(r.counters.port.counters.snapshot().drops(DropReason::Malformed), 2);
    }

    /// Descriptor tables a hostile guest might write: random addresses (in and out of
    /// its memory), lengths, flags (chained, indirect, write-only) and next indices,
    /// on both queues. Nothing may panic, and every chain the device takes is returned.
    #[test]
    fn random_descriptor_tables_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..500 {
            let features = if round % 2 == 0 { GUEST_FEATURES } else { 0 };
            let r = rig(features);
            // A transmit queue at 0 and a receive queue at 32 KiB, each with its own table.
            let queues = [
                MockSplitQueue::new(&r.mem, QSIZE),
                MockSplitQueue::create(&r.mem, GuestAddress(0x8000), QSIZE),
            ];
            let mut counts = [0u16; 2];
            for (vq, count) in queues.iter().zip(&mut counts) {
                *count = 1 + (next() % u64::from(QSIZE)) as u16;
                let descs: Vec<RawDescriptor> = (0..*count)
                    .map(|_| {
                        let addr = match next() % 4 {
                            0 => next(),
                            _ => BUFS + next() % 0x30_0000,
                        };
                        let len = (next() % 80_000) as u32;
                        let flags = (next() % 8) as u16;
                        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (next() % 32) as u16))
                    })
                    .collect();
                vq.add_desc_chains(&descs, 0).unwrap();
            }
            let (tx, rx) = (vring(&r.mem, &queues[0]), vring(&r.mem, &queues[1]));
            let mut dev = r.dev;
            for _ in 0..3 {
                let len = (next() % 70_000) as usize;
                let _ = r.ring.to_port.push(gso_frame(len));
            }
            dev.transmit(&tx);
            dev.receive(&rx);
            for (vq, n) in queues.iter().zip(counts) {
                assert!(used(vq).len() <= usize::from(n), "round {round}");
            }
        }
    }
}
