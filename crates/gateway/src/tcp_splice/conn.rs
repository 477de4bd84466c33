//! One spliced connection: the guest's TCP segments mapped onto calls on one host
//! socket. The sequence space toward the guest is the host socket's receive queue:
//! `head` is its first byte, `snd_una` the first the guest has not acknowledged and
//! `snd_nxt` the first not yet sent to it, so a retransmission peeks the same bytes
//! again and acknowledged bytes are discarded (once per pump). Toward the host, data
//! the guest sends is written within the batch it came in, or not acknowledged.

use std::io::IoSliceMut;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::Mac;
use rustix::net::{RecvFlags, SendFlags};
use smoltcp::wire::TcpControl;
use tokio::io::unix::AsyncFd;

use super::segment::{self, Emit, Flags, Out, Seg};
use crate::tcp_nat::{Direction, FlowKey};

/// Window scale we announce: windows up to 8 MiB in 16-bit fields.
pub(super) const OUR_WINDOW_SCALE: u8 = 7;
/// The most frames one peek fills.
const MAX_FRAMES_PER_PEEK: usize = 64;
/// The most payload one frame carries: an IPv4 packet's length limit less its
/// headers, for a frame the guest's port cuts into segments (or the switch does).
const MAX_FRAME_PAYLOAD: usize = 65535 - 40;
/// Retransmission timeouts: the first, and the ceiling of its back-off.
const RTO_INITIAL: Duration = Duration::from_millis(200);
const RTO_MAX: Duration = Duration::from_secs(30);
/// Retransmissions of the same data before the guest is given up on.
const MAX_RETRIES: u32 = 12;
/// Duplicate ACKs that mean a segment to the guest was lost (RFC 5681).
const DUP_ACK_THRESHOLD: u8 = 3;
/// The congestion window's start in segments (RFC 6928), and its ceiling in bytes: the
/// way to the guest can drop (a port's queue, the guest kernel's backlog), so bursts
/// grow with the guest's ACKs rather than jump to its whole window.
const INITIAL_WINDOW_SEGMENTS: u32 = 10;
const MAX_CWND: u32 = 64 << 20;
/// Guest data taken in one batch before it is written anyway.
const MAX_PENDING: usize = 256 * 1024;
/// A guest silent this long is asked whether it is still there; silent for
/// `DEAD_PEER` it is given up on (the host side gets a reset).
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(75);
pub(super) const DEAD_PEER: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// A forward: our SYN is out to the guest.
    SynSent,
    /// An egress connection: our SYN-ACK is out, the guest's ACK not yet in.
    SynReceived,
    Established,
}

/// What a step asks of the connection's task and the table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The connection is over: forget it (its host socket closes, with a reset when
    /// `reset_host`).
    pub done: bool,
    pub reset_host: bool,
    /// Wake the task: the window opened or there is something for it to do.
    pub wake: bool,
}

pub(super) struct Conn {
    pub key: FlowKey,
    pub guest_mac: Mac,
    pub gateway_mac: Mac,
    pub state: State,
    pub host: Arc<AsyncFd<OwnedFd>>,
    /// Whether the kernel keeps our peek offset (SO_PEEK_OFF on TCP: Linux 6.9+).
    peek_offset: bool,
    mss: usize,
    /// The guest's window scale, and ours; both 0 unless the guest offered scaling.
    guest_scale: u8,
    our_scale: u8,
    // Toward the guest.
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// The furthest `snd_nxt` reached: a retransmission rewinds `snd_nxt`, and ACKs
    /// up to here are still good.
    snd_max: u32,
    /// The guest's window in bytes, from `snd_una`.
    snd_wnd: u32,
    dup_acks: u8,
    /// Reno congestion control toward the guest (RFC 5681), in bytes.
    cwnd: u32,
    ssthresh: u32,
    /// In fast recovery until the guest acknowledges this (RFC 6582's `recover`).
    recover: Option<u32>,
    /// The segment at `snd_una` is to be sent again (fast retransmit), once.
    resend_first: bool,
    retries: u32,
    rto: Duration,
    retransmit_at: Option<Instant>,
    /// A forward's SYN unanswered by then: the host client is reset.
    give_up_at: Option<Instant>,
    /// Where the host's data ends, once its FIN was seen (a peek at that point reads
    /// nothing): our FIN goes there, also when sent again after a rewind.
    data_end: Option<u32>,
    fin_sent: bool,
    fin_acked: bool,
    // From the guest.
    /// The first byte not yet written to the host socket.
    rcv_nxt: u32,
    guest_fin: bool,
    /// In-order guest data of this batch of frames, written with one call when the
    /// batch ends (a call per segment cost more than the copy), and whether the
    /// guest's FIN follows it.
    pending: Vec<u8>,
    pending_fin: bool,
    /// The window we last announced, in bytes; a write the host refused shrinks it.
    announced: u32,
    /// The sequence number of the host socket's first unread byte: acknowledged bytes
    /// are discarded once per pump, not per ACK.
    head: u32,
    /// An ACK is owed to the guest (data or a FIN taken); sent once per batch.
    pub ack_due: bool,
    /// The window is closed until the host socket has room: a write found it full, or
    /// its room fell below a segment. The kernel owes us a writable edge either way.
    host_full: bool,
    /// The host socket refused guest data we had offered a window for: when it has
    /// room, duplicate ACKs ask the guest to send that data again at once.
    refused: bool,
    pub last_heard: Instant,
    probed: bool,
    /// When to probe a zero window next, and how long to wait after that.
    probe_at: Option<Instant>,
    probe_every: Duration,
    /// What the caller adds to the gateway's counters, since it last took them.
    counts: Counts,
}

/// Counter increments a connection owes the gateway's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    /// Guest bytes written to the host socket.
    pub to_host: u64,
    /// Host bytes sent to the guest, retransmissions included.
    pub to_guest: u64,
    /// Writes the host socket refused in part or whole (guest data not acknowledged).
    pub host_refusals: u64,
}

/// A guest's SYN (or SYN-ACK) options: its MSS, window scale and window.
pub(super) struct Greeting {
    pub mss: Option<u16>,
    pub scale: Option<u8>,
    pub window: u16,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: FlowKey,
        direction: Direction,
        guest_mac: Mac,
        gateway_mac: Mac,
        host: Arc<AsyncFd<OwnedFd>>,
        mtu: usize,
        iss: u32,
        now: Instant,
    ) -> Conn {
        // Probed per socket: a set offset of 0 costs nothing and says whether it works.
        let peek_offset = crate::sys::set_peek_offset(host.get_ref(), 0).is_ok();
        Conn {
            key,
            guest_mac,
            gateway_mac,
            state: if direction == Direction::Forward {
                State::SynSent
            } else {
                State::SynReceived
            },
            host,
            peek_offset,
            mss: mtu.saturating_sub(segment::headers_len(key.guest.is_ipv6()) - segment::ETH),
            guest_scale: 0,
            our_scale: 0,
            iss,
            snd_una: iss,
            snd_nxt: iss.wrapping_add(1),
            snd_max: iss.wrapping_add(1),
            snd_wnd: 0,
            dup_acks: 0,
            cwnd: INITIAL_WINDOW_SEGMENTS * 536,
            ssthresh: u32::MAX,
            recover: None,
            resend_first: false,
            retries: 0,
            rto: RTO_INITIAL,
            retransmit_at: Some(now + RTO_INITIAL),
            give_up_at: None,
            data_end: None,
            fin_sent: false,
            fin_acked: false,
            rcv_nxt: 0,
            guest_fin: false,
            pending: Vec::new(),
            pending_fin: false,
            announced: 0,
            head: iss.wrapping_add(1),
            ack_due: false,
            host_full: false,
            refused: false,
            last_heard: now,
            probed: false,
            probe_at: None,
            probe_every: RTO_INITIAL,
            counts: Counts::default(),
        }
    }

    /// A forward's host client waits this long for the guest to answer our SYN.
    pub fn give_up_unanswered_after(&mut self, timeout: Duration, now: Instant) {
        self.give_up_at = Some(now + timeout);
    }

    /// Takes the guest's options from its SYN (egress) or SYN-ACK (forward).
    pub fn greet(&mut self, seq: u32, g: &Greeting) {
        self.rcv_nxt = seq.wrapping_add(1);
        // RFC 9293: 536 when the guest names no MSS.
        self.mss = self.mss.min(usize::from(g.mss.unwrap_or(536))).max(64);
        if let Some(scale) = g.scale {
            self.guest_scale = scale.min(14);
            self.our_scale = OUR_WINDOW_SCALE;
        }
        // A SYN's window is never scaled.
        self.snd_wnd = u32::from(g.window);
        self.cwnd = INITIAL_WINDOW_SEGMENTS * self.mss as u32;
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::SynSent => "SYN-SENT",
            State::SynReceived => "SYN-RECEIVED",
            State::Established if self.guest_fin && self.fin_sent => "LAST-ACK",
            State::Established if self.guest_fin => "CLOSE-WAIT",
            State::Established if self.fin_acked => "FIN-WAIT-2",
            State::Established if self.fin_sent => "FIN-WAIT-1",
            State::Established => "ESTABLISHED",
        }
    }

    fn fd(&self) -> &OwnedFd {
        self.host.get_ref()
    }

    /// Where a data segment's payload starts in our frames.
    fn headers(&self) -> usize {
        segment::headers_len(self.key.guest.is_ipv6())
    }

    fn emit(&self) -> Emit {
        Emit {
            gateway_mac: self.gateway_mac,
            guest_mac: self.guest_mac,
            from: self.key.peer,
            to: self.key.guest,
        }
    }

    /// The window we can offer the guest: the host socket's room, so whatever the guest
    /// sends within it can be written at once. Less than a segment offers nothing
    /// (RFC 9293's receiver-side silly window avoidance), and then the window waits for
    /// the kernel's writable edge: a poll that finds the socket unwritable makes the
    /// kernel owe one (it marks the socket as wanting space), where otherwise only a
    /// failed write would.
    fn window_bytes(&mut self) -> u32 {
        // After the guest's FIN nothing more comes.
        if self.guest_fin || self.host_full {
            return 0;
        }
        // The kernel charges a write its bytes plus a little per buffer it fills, so
        // a window of all the room came up a few KiB short over megabytes of writes;
        // a sixteenth in hand covers that.
        let room = crate::sys::send_buffer_room(self.fd()).unwrap_or(0);
        let room = room - room / 16;
        if room < self.mss && !poll_writable(self.fd()) {
            self.host_full = true;
            return 0;
        }
        let ceiling = 65535usize << self.our_scale;
        room.min(ceiling) as u32
    }

    fn window_field(&mut self) -> u16 {
        let bytes = self.window_bytes();
        self.announced = bytes;
        (bytes >> self.our_scale).min(65535) as u16
    }

    /// An ACK segment with our current window (and the given flags).
    fn control(&mut self, flags: Flags, seq: u32) -> Vec<u8> {
        let window = self.window_field();
        segment::build(&self.emit(), flags, seq, self.rcv_nxt, window, None, 0)
    }

    /// Our SYN (forward) or SYN-ACK (egress), with MSS and window scale.
    pub fn handshake(&mut self) -> Vec<u8> {
        let (flags, ack) = match self.state {
            State::SynSent => (Flags::SYN, 0),
            _ => (Flags::SYN | Flags::ACK, self.rcv_nxt),
        };
        // The guest scales only if both SYNs carry the option: a forward always offers.
        let scale = (self.state == State::SynSent || self.our_scale > 0).then_some(OUR_WINDOW_SCALE);
        // Unscaled in a SYN.
        let window = self.window_bytes().min(65535) as u16;
        self.announced = u32::from(window);
        let greeting = segment::SynOptions {
            mss: self.mss.min(65535) as u16,
            scale,
        };
        segment::build(&self.emit(), flags, self.iss, ack, window, Some(greeting), 0)
    }

    /// An ACK owed to the guest, if any.
    pub fn take_ack(&mut self) -> Option<Vec<u8>> {
        if !std::mem::take(&mut self.ack_due) {
            return None;
        }
        Some(self.control(Flags::ACK, self.snd_nxt))
    }

    /// A segment from the guest. Frames to send go to `out`.
    pub fn on_segment(&mut self, seg: &Seg, now: Instant, out: &mut Out) -> Outcome {
        self.last_heard = now;
        self.probed = false;
        match self.state {
            State::SynSent => return self.on_syn_sent(seg, now, out),
            State::SynReceived if seg.control == TcpControl::Syn && seg.ack.is_none() => {
                // Our SYN-ACK was lost: the guest sent its SYN again.
                out.push(self.handshake());
                return Outcome::default();
            }
            _ => {}
        }
        if seg.control == TcpControl::Rst {
            // RFC 5961: only a reset at the expected sequence number ends the
            // connection; one elsewhere in the window draws a challenge ACK.
            if seg.seq == self.expected() {
                return Outcome {
                    done: true,
                    reset_host: true,
                    wake: false,
                };
            }
            if self.in_window(seg.seq) {
                out.push(self.control(Flags::ACK, self.snd_nxt));
            }
            return Outcome::default();
        }
        if seg.control == TcpControl::Syn {
            // A SYN on a synchronized connection: challenge ACK (RFC 5961 4.2).
            out.push(self.control(Flags::ACK, self.snd_nxt));
            return Outcome::default();
        }
        let Some(ack) = seg.ack else {
            return Outcome::default();
        };
        let mut outcome = Outcome::default();
        if self.state == State::SynReceived {
            if ack != self.iss.wrapping_add(1) {
                out.push(segment::reset_for(&self.emit(), ack));
                return Outcome::default();
            }
            self.state = State::Established;
            self.snd_una = ack;
            self.retransmit_at = None;
            self.retries = 0;
            outcome.wake = true;
        }
        outcome.wake |= self.on_ack(seg, ack, now);
        if self.fin_acked && self.guest_fin {
            // Both FINs passed on and ours acknowledged: an orderly end.
            return Outcome {
                done: true,
                reset_host: false,
                wake: false,
            };
        }
        match self.on_data(seg, out) {
            Ok(()) => {}
            Err(()) => {
                // The host side failed: the guest hears it as a reset.
                out.push(self.reset_guest());
                return Outcome {
                    done: true,
                    reset_host: true,
                    wake: false,
                };
            }
        }
        if self.fin_acked && self.guest_fin {
            outcome.done = true;
            out.extend(self.take_ack());
        }
        outcome
    }

    fn on_syn_sent(&mut self, seg: &Seg, now: Instant, out: &mut Out) -> Outcome {
        let acks_syn = seg.ack == Some(self.iss.wrapping_add(1));
        match seg.control {
            TcpControl::Rst if acks_syn => Outcome {
                done: true,
                reset_host: true,
                wake: false,
            },
            TcpControl::Syn if acks_syn => {
                self.greet(seg.seq, &seg.greeting);
                self.state = State::Established;
                self.snd_una = self.iss.wrapping_add(1);
                self.retransmit_at = None;
                self.retries = 0;
                self.last_heard = now;
                out.push(self.control(Flags::ACK, self.snd_nxt));
                Outcome {
                    wake: true,
                    ..Default::default()
                }
            }
            TcpControl::Rst => Outcome::default(),
            // Anything else acknowledging something we never sent gets a reset.
            _ => {
                if let Some(ack) = seg.ack.filter(|_| !acks_syn) {
                    out.push(segment::reset_for(&self.emit(), ack));
                }
                Outcome::default()
            }
        }
    }

    fn in_window(&self, seq: u32) -> bool {
        let offset = seq.wrapping_sub(self.rcv_nxt);
        offset < self.announced.max(1)
    }

    /// The guest acknowledged up to `ack`: what it took leaves the host socket.
    fn on_ack(&mut self, seg: &Seg, ack: u32, now: Instant) -> bool {
        let acked = ack.wrapping_sub(self.snd_una);
        let in_flight = self.snd_max.wrapping_sub(self.snd_una);
        let window = u32::from(seg.window) << self.guest_scale;
        if acked > in_flight {
            // Acknowledges what we never sent (or old): ignored, as RFC 9293 says.
            return false;
        }
        let mut wake = window > self.snd_wnd;
        if acked == 0 {
            let duplicate = in_flight > 0 && seg.payload.is_empty() && window == self.snd_wnd && !seg.fin;
            self.snd_wnd = window;
            if duplicate {
                self.dup_acks = self.dup_acks.saturating_add(1);
                if self.dup_acks == DUP_ACK_THRESHOLD && self.recover.is_none() {
                    // Fast retransmit of the one segment the guest misses; the rest
                    // of the window stays sent (going back over all of it would draw
                    // a duplicate ACK per resent segment, and more resending).
                    self.ssthresh = self.loss_threshold();
                    self.cwnd = self.ssthresh + 3 * self.mss as u32;
                    self.recover = Some(self.snd_max);
                    self.resend_first = true;
                    wake = true;
                }
            }
            return wake;
        }
        let mut data = acked;
        // Our FIN sits where the host's data ends; an ACK past it is only possible once
        // it was sent (`acked` is at most what is in flight).
        if self.data_end.is_some_and(|end| ack == end.wrapping_add(1)) {
            // Our FIN took the last sequence number.
            self.fin_acked = true;
            self.fin_sent = true;
            data -= 1;
        }
        self.snd_una = ack;
        if (self.snd_nxt.wrapping_sub(ack) as i32) < 0 {
            // Acknowledges what was sent before a rewind: sending goes on from there
            // (the kernel's peek offset stops at zero as the discard passes it).
            self.snd_nxt = ack;
        }
        self.snd_wnd = window;
        self.dup_acks = 0;
        self.retries = 0;
        self.rto = RTO_INITIAL;
        match self.recover {
            Some(recover) if (ack.wrapping_sub(recover) as i32) < 0 => {
                // A partial ACK in recovery: the next hole is at the new snd_una.
                self.resend_first = true;
            }
            Some(_) => {
                self.recover = None;
                self.cwnd = self.ssthresh;
            }
            None if self.cwnd < self.ssthresh => self.cwnd = self.cwnd.saturating_add(data.min(2 * self.mss as u32)),
            None => {
                // About one segment per round trip (RFC 5681 3.1).
                let mss = self.mss as u64;
                let growth = (mss * mss / u64::from(self.cwnd.max(1))).max(1);
                self.cwnd = self.cwnd.saturating_add(growth as u32);
            }
        }
        self.cwnd = self.cwnd.min(MAX_CWND);
        self.retransmit_at = (self.snd_max != self.snd_una).then(|| now + self.rto);
        true
    }

    /// Before an orderly close: bytes the guest acknowledged are discarded once per pump,
    /// an end can come between, and a socket closed with unread bytes resets its peer
    /// instead of ending with a FIN.
    pub fn prepare_orderly_close(&mut self) {
        self.catch_up();
    }

    /// Discards what the guest acknowledged from the host socket (the kernel moves the
    /// peek offset back by as much).
    fn catch_up(&mut self) {
        let acked_data_end = match self.data_end {
            Some(end) if self.fin_acked => end,
            _ => self.snd_una,
        };
        let len = acked_data_end.wrapping_sub(self.head) as usize;
        if len > 0 && (len as u32 as i32) > 0 {
            let dropped = discard_bytes(self.fd(), len).unwrap_or(0);
            self.head = self.head.wrapping_add(dropped as u32);
        }
    }

    /// The sequence number the guest's next byte carries: after what was written and
    /// what waits to be.
    fn expected(&self) -> u32 {
        self.rcv_nxt.wrapping_add(self.pending.len() as u32)
    }

    /// Guest data and FIN at the expected sequence number are taken for the host (see
    /// [`Conn::flush_pending`]); Err when the host is gone.
    fn on_data(&mut self, seg: &Seg, out: &mut Out) -> Result<(), ()> {
        let len = seg.payload.len() as u32;
        let offset = self.expected().wrapping_sub(seg.seq);
        let fin = seg.fin;
        if len == 0 && !fin {
            // A keep-alive probe (one below what we expect) is answered; a pure ACK
            // is not.
            if offset != 0 {
                self.ack_due = true;
            }
            return Ok(());
        }
        if self.guest_fin || self.pending_fin || offset > len || (offset == len && !fin) {
            // Out of order, old, or after the guest's FIN: an ACK at once says what we
            // have (a duplicate ACK asks for what is missing).
            self.flush_pending()?;
            out.push(self.control(Flags::ACK, self.snd_nxt));
            return Ok(());
        }
        self.pending.extend_from_slice(&seg.payload[offset as usize..]);
        self.pending_fin = fin;
        self.ack_due = true;
        if self.pending.len() >= MAX_PENDING {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Writes the batch's guest data to the host socket in one call; what it does not
    /// take is not acknowledged (the guest sends it again), and the window closes until
    /// the socket has room. The guest's FIN passes on once everything before it did.
    /// Err when the host is gone.
    pub fn flush_pending(&mut self) -> Result<(), ()> {
        let mut fin = std::mem::take(&mut self.pending_fin);
        if !self.pending.is_empty() {
            // Whatever the socket takes, the guest hears of it (a segment sent in the
            // meantime acknowledged only what was written before).
            self.ack_due = true;
            match rustix::net::send(self.fd(), &self.pending, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(n) => {
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    self.counts.to_host += n as u64;
                    if n < self.pending.len() {
                        self.refuse();
                        fin = false;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => {
                    self.refuse();
                    fin = false;
                }
                Err(_) => {
                    self.pending.clear();
                    return Err(());
                }
            }
            self.pending.clear();
        }
        if fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.guest_fin = true;
            self.ack_due = true;
            let _ = rustix::net::shutdown(self.fd(), rustix::net::Shutdown::Write);
        }
        Ok(())
    }

    /// The host socket took less than the guest sent: the rest is not acknowledged.
    fn refuse(&mut self) {
        self.host_full = true;
        self.refused = true;
        self.counts.host_refusals += 1;
    }

    /// The counter increments since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Both FINs passed on and ours acknowledged: an orderly end.
    pub fn finished(&self) -> bool {
        self.fin_acked && self.guest_fin
    }

    /// Half the data in flight, at least two segments: the slow-start threshold after
    /// a loss.
    fn loss_threshold(&self) -> u32 {
        (self.snd_max.wrapping_sub(self.snd_una) / 2).max(2 * self.mss as u32)
    }

    /// What may be in flight now: the guest's window, within the congestion window.
    fn send_limit(&self) -> u32 {
        self.snd_wnd.min(self.cwnd)
    }

    fn advance_max(&mut self) {
        if (self.snd_nxt.wrapping_sub(self.snd_max) as i32) > 0 {
            self.snd_max = self.snd_nxt;
        }
    }

    /// Starts sending again from the oldest unacknowledged byte.
    fn rewind(&mut self) {
        self.catch_up();
        self.snd_nxt = self.snd_una;
        if self.fin_sent && !self.fin_acked {
            self.fin_sent = false;
        }
        if self.peek_offset {
            let _ = crate::sys::set_peek_offset(self.fd(), 0);
        }
        self.dup_acks = 0;
    }

    /// Sends the guest what the host socket holds, as far as the guest's window and the
    /// congestion window go, then our FIN once the host's data is all sent. `Err` when
    /// the host side failed.
    pub fn pump(&mut self, now: Instant, out: &mut Out) -> Result<(), ()> {
        if self.state != State::Established || self.fin_sent {
            return Ok(());
        }
        self.catch_up();
        if std::mem::take(&mut self.resend_first) {
            self.resend_first_segment(out)?;
        }
        loop {
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
            let room = self.send_limit().saturating_sub(in_flight) as usize;
            if room == 0 || self.data_end == Some(self.snd_nxt) {
                break;
            }
            let before = out.len();
            match self.peek_frames(room, out) {
                Ok(0) => {
                    out.truncate(before);
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    out.truncate(before);
                    return e;
                }
            }
            if self.retransmit_at.is_none() {
                self.retransmit_at = Some(now + self.rto);
            }
        }
        if self.data_end == Some(self.snd_nxt) && !self.fin_sent {
            let window = self.window_field();
            out.push(segment::build(
                &self.emit(),
                Flags::FIN | Flags::ACK,
                self.snd_nxt,
                self.rcv_nxt,
                window,
                None,
                0,
            ));
            self.ack_due = false;
            self.fin_sent = true;
            self.snd_nxt = self.snd_nxt.wrapping_add(1);
            self.advance_max();
            self.retransmit_at.get_or_insert(now + self.rto);
        }
        Ok(())
    }

    /// Sends the segment at `snd_una` again (or the FIN, if that is what is missing),
    /// leaving `snd_nxt` where it is.
    fn resend_first_segment(&mut self, out: &mut Out) -> Result<(), ()> {
        if self.snd_max == self.snd_una {
            return Ok(());
        }
        let window = self.window_field();
        if self.data_end == Some(self.snd_una) {
            out.push(segment::build(
                &self.emit(),
                Flags::FIN | Flags::ACK,
                self.snd_una,
                self.rcv_nxt,
                window,
                None,
                0,
            ));
            return Ok(());
        }
        self.catch_up();
        let len = self.mss.min(self.snd_max.wrapping_sub(self.snd_una) as usize);
        let mut frame = vec![0u8; self.headers() + len];
        if self.peek_offset {
            let _ = crate::sys::set_peek_offset(self.fd(), 0);
        }
        let peeked = rustix::net::recv(
            self.fd(),
            &mut frame[self.headers()..],
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        );
        if self.peek_offset {
            let _ = crate::sys::set_peek_offset(self.fd(), self.snd_nxt.wrapping_sub(self.head) as usize);
        }
        match peeked {
            Ok((n, _)) if n > 0 => {
                frame.truncate(self.headers() + n.min(len));
                self.counts.to_guest += n.min(len) as u64;
                segment::fill(&self.emit(), &mut frame, Flags::ACK, self.snd_una, self.rcv_nxt, window);
                out.push(frame);
                Ok(())
            }
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(_) => Err(()),
        }
    }

    /// Peeks up to `room` bytes straight into frames of up to [`MAX_FRAME_PAYLOAD`]
    /// (whole segments each) and fills their headers, the TCP checksum and the cutting
    /// into segments left to the port (see [`segment::fill_deferred`]). Ok(bytes sent);
    /// Err(Ok) when the host has nothing now, Err(Err) when it failed.
    fn peek_frames(&mut self, room: usize, out: &mut Out) -> Result<usize, Result<(), ()>> {
        let offset = self.snd_nxt.wrapping_sub(self.head) as usize;
        // Buffers only for what the socket holds (a window can be megabytes, the queue
        // a few bytes); at least a segment's, so that a peek still tells the host's FIN
        // (nothing to read, not EAGAIN) apart.
        let unsent =
            rustix::io::ioctl_fionread(self.fd()).map_or(room, |queued| (queued as usize).saturating_sub(offset));
        let room = room.min(unsent.max(self.mss));
        let per_frame = self.mss * (MAX_FRAME_PAYLOAD / self.mss).max(1);
        let count = room.div_ceil(per_frame).min(MAX_FRAMES_PER_PEEK);
        let mut frames: Vec<Vec<u8>> = (0..count)
            .map(|i| vec![0u8; self.headers() + per_frame.min(room - i * per_frame)])
            .collect();
        // Without a kernel peek offset, the bytes already sent are peeked again into a
        // scratch buffer ahead of the frames.
        let mut skip = if self.peek_offset {
            Vec::new()
        } else {
            vec![0u8; offset]
        };
        let peeked = {
            let mut iov: Vec<IoSliceMut> = Vec::with_capacity(count + 1);
            if !skip.is_empty() {
                iov.push(IoSliceMut::new(&mut skip));
            }
            iov.extend(frames.iter_mut().map(|f| IoSliceMut::new(&mut f[self.headers()..])));
            rustix::net::recvmsg(
                self.fd(),
                &mut iov,
                &mut rustix::net::RecvAncillaryBuffer::default(),
                RecvFlags::PEEK | RecvFlags::DONTWAIT,
            )
        };
        let peeked = match peeked {
            Ok(r) => r.bytes.saturating_sub(skip.len()),
            Err(rustix::io::Errno::AGAIN) => return Err(Ok(())),
            Err(_) => return Err(Err(())),
        };
        if peeked == 0 {
            // A peek that returns nothing without EAGAIN: the host's FIN, everything
            // before it already read.
            self.data_end = Some(self.snd_nxt);
            return Ok(0);
        }
        let window = self.window_field();
        let mss = self.mss.min(usize::from(u16::MAX)) as u16;
        let mut left = peeked;
        for mut frame in frames {
            if left == 0 {
                break;
            }
            let len = (frame.len() - self.headers()).min(left);
            frame.truncate(self.headers() + len);
            left -= len;
            let flags = if left == 0 { Flags::ACK | Flags::PSH } else { Flags::ACK };
            let offload =
                segment::fill_deferred(&self.emit(), &mut frame, flags, self.snd_nxt, self.rcv_nxt, window, mss);
            self.snd_nxt = self.snd_nxt.wrapping_add(len as u32);
            self.advance_max();
            self.counts.to_guest += len as u64;
            out.push_offloaded(frame, offload);
        }
        self.ack_due = false;
        Ok(peeked)
    }

    /// Retransmission, zero-window probes and keep-alive; Err when the guest is given
    /// up on. Returns when to call again.
    pub fn on_timer(&mut self, now: Instant, out: &mut Out) -> Result<(), ()> {
        if now.duration_since(self.last_heard) >= DEAD_PEER {
            out.push(segment::reset_for(&self.emit(), self.snd_nxt));
            return Err(());
        }
        if self.state == State::SynSent && self.give_up_at.is_some_and(|at| at <= now) {
            return Err(());
        }
        if self.retransmit_at.is_some_and(|at| at <= now) {
            self.retries += 1;
            if self.retries > MAX_RETRIES {
                out.push(segment::reset_for(&self.emit(), self.snd_nxt));
                return Err(());
            }
            self.rto = (self.rto * 2).min(RTO_MAX);
            self.retransmit_at = Some(now + self.rto);

            match self.state {
                State::SynSent | State::SynReceived => out.push(self.handshake()),
                State::Established if self.snd_max != self.snd_una => {
                    self.ssthresh = self.loss_threshold();
                    self.cwnd = 2 * self.mss as u32;
                    self.recover = None;
                    self.rewind();
                }
                State::Established => self.retransmit_at = None,
            }
        }
        // A zero window with nothing in flight: probe with an old sequence number,
        // which the guest answers with its window (else a lost window update would
        // stall the connection). Backed off, but never given up while it answers.
        let zero_window = self.state == State::Established
            && self.snd_wnd == 0
            && self.snd_max == self.snd_una
            && !self.fin_sent
            && self.data_end.is_none();
        if !zero_window {
            self.probe_at = None;
            self.probe_every = RTO_INITIAL;
        } else if self.probe_at.is_none() {
            self.probe_at = Some(now + self.probe_every);
        } else if self.probe_at.is_some_and(|at| at <= now) {
            out.push(self.control(Flags::ACK, self.snd_una.wrapping_sub(1)));
            self.probe_every = (self.probe_every * 2).min(RTO_MAX);
            self.probe_at = Some(now + self.probe_every);
        }
        if now.duration_since(self.last_heard) >= KEEP_ALIVE && !self.probed && self.state == State::Established {
            self.probed = true;
            out.push(self.control(Flags::ACK, self.snd_una.wrapping_sub(1)));
        }
        Ok(())
    }

    /// When [`Conn::on_timer`] has work next.
    pub fn deadline(&self) -> Instant {
        let keep_alive = self.last_heard + if self.probed { DEAD_PEER } else { KEEP_ALIVE };
        let give_up = self.give_up_at.filter(|_| self.state == State::SynSent);
        [self.retransmit_at, self.probe_at, give_up]
            .into_iter()
            .flatten()
            .fold(keep_alive, Instant::min)
    }

    /// The host's send side has room again: announce it, and if the guest sent data
    /// we could not take, ask for it again at once with duplicate ACKs.
    pub fn host_writable(&mut self, out: &mut Out) {
        if !self.host_full {
            return;
        }
        self.host_full = false;
        let update = self.control(Flags::ACK, self.snd_nxt);
        if self.host_full {
            // Still less than a segment of room: the next edge reopens it.
            return;
        }
        if std::mem::take(&mut self.refused) {
            for _ in 0..DUP_ACK_THRESHOLD {
                out.push(update.clone());
            }
        }
        out.push(update);
    }

    /// A reset toward the guest, for a host side that failed.
    pub fn reset_guest(&self) -> Vec<u8> {
        segment::reset_for(&self.emit(), self.snd_nxt)
    }

    pub fn wants_host_writable(&self) -> bool {
        self.host_full
    }

    /// Whether there is room in the guest's window to read more from the host now.
    pub fn wants_host_readable(&self) -> bool {
        self.state == State::Established
            && self.data_end.is_none()
            && self.send_limit() > self.snd_nxt.wrapping_sub(self.snd_una)
    }
}

/// Whether the socket could take a write now. A poll that says no leaves the socket
/// marked as wanting space, so the kernel signals the writable edge when it has some.
fn poll_writable(fd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::OUT)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(n) => n > 0 && fds[0].revents().contains(rustix::event::PollFlags::OUT),
        Err(_) => false,
    }
}

/// Discards up to `len` bytes of a TCP socket's receive queue. MSG_TRUNC makes the
/// kernel drop them without copying; rustix still wants a buffer as long as each read,
/// so a fixed sink (never written) gives the lengths.
fn discard_bytes(fd: &OwnedFd, len: usize) -> rustix::io::Result<usize> {
    thread_local! {
        static SINK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    SINK.with(|sink| {
        let mut sink = sink.borrow_mut();
        let mut dropped = 0;
        while dropped < len {
            let chunk = (len - dropped).min(sink.len());
            match rustix::net::recv(fd, &mut sink[..chunk], RecvFlags::TRUNC | RecvFlags::DONTWAIT) {
                Ok((0, _)) => break,
                Ok((n, _)) => dropped += n.min(chunk),
                Err(rustix::io::Errno::AGAIN) if dropped > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(dropped)
    })
}
