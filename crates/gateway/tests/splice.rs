//! The TCP splice driven segment by segment: a scripted guest (`TcpPeer`) on a
//! socketpair port of a real switch talks through the gateway to a real host socket on
//! loopback. Each test plays one situation a real guest stack meets: loss, zero
//! windows, a reader that stops, resets in each state, data out of order, a host that
//! stops reading.

mod common;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use fabric::offload::{Offload, SoftFrames};
use fabric::InProcessEnd;
use gateway::tcp_peer::{Seen, Segment, TcpPeer};
use gateway::TcpEngine;
use smoltcp::wire::TcpControl;

/// The guest's port: a socketpair (frames plain, as the switch cuts them), or an
/// in-process port that takes offloads (a vhost-user guest's view: 64 KiB segments
/// with their checksums left partial, both ways).
enum GuestPort {
    Socket(UnixDatagram),
    Offloaded(InProcessEnd),
}

struct Rig {
    lab: common::Lab,
    guest: GuestPort,
    /// The most payload one frame to the guest carried.
    largest_frame_payload: usize,
    peer: TcpPeer,
    listener: TcpListener,
}

const HOST_ACCESS: Ipv4Addr = Ipv4Addr::new(10, 67, 0, 254);

fn rig(guest_host: u8) -> Rig {
    rig_on(guest_host, false)
}

fn rig_on(guest_host: u8, offloaded: bool) -> Rig {
    rig_with(guest_host, offloaded, |_| {})
}

fn rig_with(guest_host: u8, offloaded: bool, tune: impl FnOnce(&mut gateway::GatewayConfig)) -> Rig {
    let lab = common::lab("sp", "10.67.0.0/24", |cfg| {
        cfg.host_access = Some(HOST_ACCESS);
        cfg.tcp_engine = TcpEngine::Splice;
        tune(cfg);
    });
    let guest = if offloaded {
        let (_, end) = lab.sw.add_inprocess_port("sp", "guest").unwrap();
        end.take_offloads();
        GuestPort::Offloaded(end)
    } else {
        let (_, fd) = lab.sw.add_port("sp", "guest").unwrap();
        GuestPort::Socket(UnixDatagram::from(fd))
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peer = TcpPeer::guest(guest_host, listener.local_addr().unwrap().port());
    peer.ip = Ipv4Addr::new(10, 67, 0, guest_host).into();
    peer.server_ip = HOST_ACCESS.into();
    peer.server_mac = lab.gw.config().gateway_mac.0;
    Rig {
        lab,
        guest,
        largest_frame_payload: 0,
        peer,
        listener,
    }
}

impl Rig {
    fn send(&mut self, seg: Segment) {
        let mut frame = self.peer.segment(&seg);
        match &self.guest {
            GuestPort::Socket(s) => {
                s.send(&frame).unwrap();
            }
            GuestPort::Offloaded(end) => {
                // As a guest kernel with TSO hands it over: checksum left, cut later.
                let offload = Offload::defer_tcp_checksum(&mut frame, 1460).unwrap();
                let mut queue = VecDeque::from([(frame, offload)]);
                while end.send_owned(&mut queue).is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// What the gateway sent the guest within `wait` (reading stops early once `until`
    /// says enough).
    fn recv_until(&mut self, wait: Duration, until: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 70000];
        while !until(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let frames = match &self.guest {
                GuestPort::Socket(s) => {
                    s.set_read_timeout(Some(left)).unwrap();
                    match s.recv(&mut buf) {
                        Ok(n) => vec![buf[..n].to_vec()],
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                GuestPort::Offloaded(end) => {
                    let Some((frame, offload)) = end.try_recv_offloaded() else {
                        std::thread::sleep(Duration::from_millis(1).min(left));
                        continue;
                    };
                    // The peer checks every checksum: complete them as the guest's
                    // kernel would take them.
                    self.largest_frame_payload = self.largest_frame_payload.max(frame.len() - 54);
                    let mut soft = SoftFrames::default();
                    soft.push(&frame, &offload).unwrap();
                    soft.frames().to_vec()
                }
            };
            seen.extend(self.peer.read(&frames));
        }
        seen
    }

    fn recv_for(&mut self, wait: Duration) -> Vec<Seen> {
        self.recv_until(wait, |_| false)
    }

    /// SYN (with the given window scale) and the gateway's SYN-ACK; the host side's
    /// accepted socket.
    fn open(&mut self, scale: Option<u8>) -> (TcpStream, Seen) {
        self.send(Segment {
            syn: true,
            window: 65535,
            window_scale: scale,
            mss: Some(1460),
            ..Default::default()
        });
        let (host, _) = self.listener.accept().unwrap();
        let seen = self.recv_until(Duration::from_secs(5), |s| {
            s.iter().any(|s| s.control == TcpControl::Syn)
        });
        let syn_ack = seen
            .into_iter()
            .find(|s| s.control == TcpControl::Syn)
            .expect("a SYN-ACK");
        (host, syn_ack)
    }

    /// A pure ACK of everything received, with `window` (in the field's units).
    fn ack(&mut self, window: u16) {
        self.send(Segment {
            ack: true,
            window,
            ..Default::default()
        });
    }

    fn flows(&self) -> usize {
        self.lab.gw.tcp_flows().len()
    }

    fn wait_no_flows(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.flows() > 0 {
            assert!(Instant::now() < deadline, "flows left: {:?}", self.lab.gw.tcp_flows());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Appends to `got` what `seen` adds to the stream that starts at sequence `start`
/// (retransmitted bytes only once).
fn assemble(got: &mut Vec<u8>, start: u32, seen: &[Seen]) {
    for s in seen {
        let offset = s.seq.wrapping_sub(start) as usize;
        if offset <= got.len() && offset + s.payload.len() > got.len() {
            let skip = got.len() - offset;
            got.extend_from_slice(&s.payload[skip..]);
        }
    }
}

fn payload_of(seen: &[Seen]) -> Vec<u8> {
    seen.iter().flat_map(|s| s.payload.iter().copied()).collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn the_handshake_announces_mss_and_scale_and_lost_data_is_sent_again_from_the_host_socket() {
    let mut r = rig(9);
    let (mut host, syn_ack) = r.open(Some(7));
    assert_eq!(syn_ack.ack, Some(1001));
    assert_eq!(syn_ack.window_scale, Some(7), "scaling offered back");
    r.ack(65535);
    // Guest to host, acknowledged.
    r.send(Segment {
        ack: true,
        window: 65535,
        payload: b"hello",
        ..Default::default()
    });
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    let acks = r.recv_until(Duration::from_secs(2), |s| s.iter().any(|s| s.ack == Some(1006)));
    assert!(acks.iter().any(|s| s.ack == Some(1006)), "{acks:?}");

    // Host to guest: sent, then lost (the guest acknowledges nothing).
    let data = pattern(5000);
    host.write_all(&data).unwrap();
    let acked_before = r.peer.ack;
    let first = r.recv_until(Duration::from_secs(2), |s| payload_of(s).len() >= 5000);
    assert_eq!(payload_of(&first), data);
    let first_seq = first.iter().find(|s| !s.payload.is_empty()).unwrap().seq;
    assert_eq!(first_seq, syn_ack.seq.wrapping_add(1));
    r.peer.ack = acked_before;
    // The retransmission carries the same bytes from the same sequence number (as
    // many as the collapsed congestion window allows).
    let again = r.recv_until(Duration::from_secs(3), |s| !payload_of(s).is_empty());
    let resent = again.iter().find(|s| !s.payload.is_empty()).expect("a retransmission");
    assert_eq!(resent.seq, first_seq);
    assert_eq!(resent.payload[..], data[..resent.payload.len()]);
    // All acknowledged: nothing is sent again.
    r.peer.ack = first_seq.wrapping_add(5000);
    r.ack(65535);
    // What was on its way before the ACK arrived is not counted.
    r.recv_for(Duration::from_millis(100));
    let after = r.recv_for(Duration::from_millis(1200));
    let resent: Vec<(u32, usize)> = after.iter().map(|s| (s.seq, s.payload.len())).collect();
    assert!(payload_of(&after).is_empty(), "sent again after the ACK: {resent:?}");
    assert_eq!(r.flows(), 1);
}

#[test]
fn a_zero_window_keeps_data_in_the_host_socket_and_is_probed_until_it_opens() {
    let mut r = rig(10);
    let (mut host, syn_ack) = r.open(None);
    r.ack(0);
    let data = pattern(100_000);
    host.write_all(&data).unwrap();
    let closed = r.recv_for(Duration::from_millis(1600));
    assert!(payload_of(&closed).is_empty(), "data into a zero window");
    let probes = closed.iter().filter(|s| s.payload.is_empty()).count();
    assert!(probes >= 2, "window probes seen: {closed:?}");
    // The window opens: everything arrives, in order, as the guest acknowledges it.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < data.len() && Instant::now() < deadline {
        r.ack(65535);
        let seen = r.recv_until(Duration::from_millis(300), |s| payload_of(s).len() >= 60000);
        assemble(&mut got, syn_ack.seq.wrapping_add(1), &seen);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
}

#[test]
fn a_guest_that_stops_reading_stalls_the_host_writer_and_gets_no_more_than_its_window() {
    let mut r = rig(11);
    let (host, syn_ack) = r.open(None);
    r.ack(20000);
    host.set_nonblocking(true).unwrap();
    let chunk = pattern(65536);
    let mut written = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The host writes until its socket is full: the gateway took only the window.
    loop {
        match (&host).write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(200));
                if matches!((&host).write(&chunk), Err(ref e) if e.kind() == ErrorKind::WouldBlock) {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the host never stalled ({written} bytes)");
    }
    assert!(written > 20000, "the host wrote only {written} bytes");
    // Everything the guest was sent (first sends and retransmissions) lies within the
    // 20,000 bytes it offered.
    let seen = r.recv_for(Duration::from_millis(500));
    let start = syn_ack.seq.wrapping_add(1);
    let furthest = seen
        .iter()
        .filter(|s| !s.payload.is_empty())
        .map(|s| s.seq.wrapping_add(s.payload.len() as u32).wrapping_sub(start))
        .max()
        .expect("data sent");
    assert!(furthest <= 20000, "past the window: {furthest}");
    assert_eq!(r.flows(), 1, "the connection stays while the guest is there");
}

#[test]
fn resets_end_the_connection_in_each_state_and_a_misplaced_one_draws_a_challenge() {
    // Before the handshake completes.
    let mut r = rig(12);
    let (mut host, _) = r.open(None);
    r.send(Segment {
        rst: true,
        ..Default::default()
    });
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        host.read(&mut [0u8; 8]).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset)
    );
    r.wait_no_flows();

    // Established; a reset off the expected number first.
    r.peer.port += 1;
    r.peer.seq = 5000;
    let (mut host, _) = r.open(None);
    r.ack(65535);
    r.send(Segment {
        rst: true,
        seq: Some(r.peer.seq.wrapping_add(100)),
        ..Default::default()
    });
    let challenge = r.recv_until(Duration::from_secs(2), |s| !s.is_empty());
    assert!(
        challenge
            .iter()
            .any(|s| s.control == TcpControl::None && s.ack == Some(r.peer.seq)),
        "a challenge ACK: {challenge:?}"
    );
    assert_eq!(r.flows(), 1, "a misplaced reset ends nothing");
    r.send(Segment {
        rst: true,
        ..Default::default()
    });
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        host.read(&mut [0u8; 8]).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset)
    );
    r.wait_no_flows();

    // After the guest's FIN (the host still open).
    r.peer.port += 1;
    let (mut host, _) = r.open(None);
    r.ack(65535);
    r.send(Segment {
        fin: true,
        ack: true,
        window: 65535,
        ..Default::default()
    });
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0, "the guest's FIN");
    r.send(Segment {
        rst: true,
        ..Default::default()
    });
    r.wait_no_flows();
    std::thread::sleep(Duration::from_millis(50));
    let _ = host.write(b"x");
    std::thread::sleep(Duration::from_millis(50));
    assert!(host.write(b"x").is_err(), "the host side was reset");

    // After the host's FIN.
    r.peer.port += 1;
    let (host, _) = r.open(None);
    r.ack(65535);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let fin = r.recv_until(Duration::from_secs(3), |s| {
        s.iter().any(|s| s.control == TcpControl::Fin)
    });
    assert!(fin.iter().any(|s| s.control == TcpControl::Fin), "{fin:?}");
    r.send(Segment {
        rst: true,
        ..Default::default()
    });
    r.wait_no_flows();

    // No connection at all: a reset answers.
    r.peer.port += 1;
    r.send(Segment {
        ack: true,
        window: 65535,
        payload: b"stray",
        ..Default::default()
    });
    let answer = r.recv_until(Duration::from_secs(2), |s| !s.is_empty());
    assert!(answer.iter().any(|s| s.control == TcpControl::Rst), "{answer:?}");
}

#[test]
fn data_out_of_order_is_not_written_and_draws_a_duplicate_ack() {
    let mut r = rig(13);
    let (mut host, _) = r.open(None);
    r.ack(65535);
    let expected = r.peer.seq;
    r.send(Segment {
        ack: true,
        window: 65535,
        seq: Some(expected.wrapping_add(100)),
        payload: b"from the future",
        ..Default::default()
    });
    let dup = r.recv_until(Duration::from_secs(2), |s| !s.is_empty());
    assert!(dup.iter().any(|s| s.ack == Some(expected)), "{dup:?}");
    host.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        host.read(&mut [0u8; 64]).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock)
    );
    // Old data (already taken) is not written twice.
    r.send(Segment {
        ack: true,
        window: 65535,
        payload: b"in order",
        ..Default::default()
    });
    r.send(Segment {
        ack: true,
        window: 65535,
        seq: Some(expected),
        payload: b"in order",
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut got = vec![0u8; 64];
    let n = host.read(&mut got).unwrap();
    assert_eq!(&got[..n], b"in order");
}

#[test]
fn a_host_that_stops_reading_closes_the_window_and_the_rest_follows_when_it_reads() {
    let mut r = rig(14);
    // A small receive buffer (the accepted socket inherits it), so the host's side
    // fills soon.
    rustix::net::sockopt::set_socket_recv_buffer_size(&r.listener, 65536).unwrap();
    let (mut host, syn_ack) = r.open(None);
    r.ack(65535);
    let data = pattern(16 << 20);
    let mut sent = 0usize;
    let mut window = u32::from(syn_ack.window);
    let mut acked_to = r.peer.seq;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Send as the window allows, until it closes with the host not reading.
    while sent < data.len() && Instant::now() < deadline {
        let in_flight = r.peer.seq.wrapping_sub(acked_to) as usize;
        let room = (window as usize).saturating_sub(in_flight);
        if room >= 1400 {
            let end = (sent + 1400).min(data.len());
            r.send(Segment {
                ack: true,
                window: 65535,
                payload: &data[sent..end],
                ..Default::default()
            });
            sent = end;
            continue;
        }
        let all_in = r.peer.seq;
        let seen = r.recv_until(Duration::from_millis(300), |s| s.iter().any(|s| s.ack == Some(all_in)));
        let Some(last) = seen.iter().rfind(|s| s.ack.is_some()) else {
            if window == 0 {
                break;
            }
            // Nothing came back: what was in flight was not taken; send it again.
            r.peer.seq = acked_to;
            sent = acked_to.wrapping_sub(1001) as usize;
            continue;
        };
        acked_to = last.ack.unwrap();
        window = u32::from(last.window);
        sent = acked_to.wrapping_sub(1001) as usize;
        r.peer.seq = acked_to;
        if window == 0 {
            break;
        }
    }
    assert_eq!(
        window, 0,
        "the window closed with the host not reading ({sent} bytes taken)"
    );
    assert!(sent < data.len());
    // The window never offered more than the host socket took: nothing sent within
    // it was refused (a refusal costs the guest a retransmission, a timeout at worst).
    assert_eq!(r.lab.gw.counters().get("nat_tcp_host_refusals"), Some(0));
    // The host reads: the gateway announces room, and the rest goes through.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        got
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut taken = acked_to.wrapping_sub(1001) as usize;
    let mut window = 0u32;
    while taken < data.len() {
        assert!(Instant::now() < deadline, "stuck at {taken} of {}", data.len());
        let seen = r.recv_for(Duration::from_millis(if window == 0 { 200 } else { 20 }));
        if let Some(last) = seen.iter().rfind(|s| s.ack.is_some()) {
            taken = last.ack.unwrap().wrapping_sub(1001) as usize;
            window = u32::from(last.window);
        }
        r.peer.seq = 1001u32.wrapping_add(taken as u32);
        let mut offered = 0usize;
        while taken + offered < data.len() && offered + 1400 <= window as usize {
            let end = (taken + offered + 1400).min(data.len());
            r.send(Segment {
                ack: true,
                window: 65535,
                payload: &data[taken + offered..end],
                ..Default::default()
            });
            offered = end - taken;
        }
        if window == 0 {
            // A zero-window probe, as a guest stack sends one.
            r.send(Segment {
                ack: true,
                window: 65535,
                seq: Some(1000u32.wrapping_add(taken as u32)),
                ..Default::default()
            });
            r.peer.seq = 1001u32.wrapping_add(taken as u32);
        }
    }
    r.send(Segment {
        fin: true,
        ack: true,
        window: 65535,
        ..Default::default()
    });
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
}

#[test]
fn a_lost_fin_is_sent_again_where_the_data_ends_and_both_fins_end_the_connection() {
    let mut r = rig(15);
    let (mut host, syn_ack) = r.open(None);
    r.ack(65535);
    let data = pattern(3000);
    host.write_all(&data).unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let start = syn_ack.seq.wrapping_add(1);
    let fin_at = start.wrapping_add(3000);
    let acked = r.peer.ack;
    let has_fin = |s: &[Seen]| s.iter().any(|s| s.control == TcpControl::Fin);
    let first = r.recv_until(Duration::from_secs(2), has_fin);
    assert_eq!(
        first.iter().find(|s| s.control == TcpControl::Fin).map(|s| s.seq),
        Some(fin_at)
    );
    // Lost: nothing acknowledged. The retransmission resends the data, then the FIN
    // at the same place, as the guest acknowledges what comes again.
    r.peer.ack = acked;
    let mut got = Vec::new();
    let mut fin_seen = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fin_seen.is_none() && Instant::now() < deadline {
        let again = r.recv_until(Duration::from_secs(2), |s| !s.is_empty());
        assemble(&mut got, start, &again);
        fin_seen = again.iter().find(|s| s.control == TcpControl::Fin).map(|s| s.seq);
        r.ack(65535);
    }
    assert_eq!(fin_seen, Some(fin_at));
    assert!(got == data, "the data before the FIN, sent again");
    r.send(Segment {
        fin: true,
        ack: true,
        window: 65535,
        ..Default::default()
    });
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    r.wait_no_flows();
}

#[test]
fn three_duplicate_acks_resend_the_lost_segment_and_not_the_window_after_it() {
    let mut r = rig(16);
    let (mut host, syn_ack) = r.open(None);
    r.ack(65535);
    let data = pattern(8 * 1460);
    host.write_all(&data).unwrap();
    let start = syn_ack.seq.wrapping_add(1);
    let first = r.recv_until(Duration::from_secs(2), |s| payload_of(s).len() >= 8 * 1460);
    assert_eq!(payload_of(&first), data);
    // The first segment was lost: the guest acknowledges up to it, three times over.
    r.peer.ack = start;
    for _ in 0..3 {
        r.ack(65535);
    }
    let mut resent = r.recv_until(Duration::from_secs(2), |s| !payload_of(s).is_empty());
    resent.extend(r.recv_for(Duration::from_millis(100)));
    let seqs: Vec<u32> = resent
        .iter()
        .filter(|s| !s.payload.is_empty())
        .map(|s| s.seq.wrapping_sub(start))
        .collect();
    assert_eq!(seqs.first(), Some(&0), "the missing segment first: {seqs:?}");
    // Going back over the whole window would resend segments 2..8 too (a retransmission
    // timeout, were one to pass meanwhile, resends two at most).
    assert!(seqs.iter().all(|&s| s < 2 * 1460), "resent past the hole: {seqs:?}");
    // Acknowledged whole: nothing more.
    r.peer.ack = start.wrapping_add(8 * 1460);
    r.ack(65535);
    r.recv_for(Duration::from_millis(100));
    assert!(payload_of(&r.recv_for(Duration::from_millis(600))).is_empty());
}

#[test]
fn segment_offloads_cross_whole_both_ways_with_checksums_left_to_the_ports() {
    let mut r = rig_on(15, true);
    let (mut host, syn_ack) = r.open(Some(7));
    r.ack(65535);
    // Guest to host: one 60,000-byte segment, its checksum left partial, reaches the
    // host socket whole (the gateway's port takes it as it is).
    let up = pattern(60_000);
    r.send(Segment {
        ack: true,
        window: 65535,
        payload: &up,
        ..Default::default()
    });
    host.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = vec![0u8; up.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, up);
    // Host to guest: frames carry many segments each, checksums left to the port.
    let down = pattern(1 << 20);
    let writer = std::thread::spawn(move || {
        host.write_all(&down).unwrap();
        host
    });
    let mut received = Vec::new();
    let start = syn_ack.seq.wrapping_add(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() < 1 << 20 {
        assert!(Instant::now() < deadline, "stuck at {}", received.len());
        let seen = r.recv_until(Duration::from_millis(200), |s| !s.is_empty());
        assemble(&mut received, start, &seen);
        r.peer.ack = start.wrapping_add(received.len() as u32);
        r.ack(65535);
    }
    assert_eq!(received, pattern(1 << 20));
    assert!(
        r.largest_frame_payload > 1460,
        "frames of one segment only: {}",
        r.largest_frame_payload
    );
    let _host = writer.join().unwrap();
    let c = r.lab.gw.counters();
    assert_eq!(
        (c.get("malformed_frames"), c.get("nat_tcp_host_refusals")),
        (Some(0), Some(0))
    );
}

#[test]
fn a_forward_to_a_guest_that_never_answers_resets_its_client_after_the_connect_timeout() {
    let mut r = rig_with(16, false, |cfg| cfg.tcp_connect_timeout = Duration::from_secs(1));
    // The guest is heard from (its MAC known), then answers nothing.
    let arp = r.peer.arp_request();
    if let GuestPort::Socket(s) = &r.guest {
        s.send(&arp).unwrap();
    }
    let fw = r
        .lab
        .gw
        .add_forward(
            gateway::forward::Protocol::Tcp,
            "127.0.0.1:0".parse().unwrap(),
            std::net::SocketAddr::new(r.peer.ip, r.peer.port),
        )
        .unwrap();
    let started = Instant::now();
    let mut client = TcpStream::connect(fw.host).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let syns = r.recv_until(Duration::from_secs(3), |s| {
        s.iter().any(|s| s.control == TcpControl::Syn)
    });
    assert!(
        syns.iter().any(|s| s.control == TcpControl::Syn),
        "our SYN reached the guest"
    );
    let mut byte = [0u8; 1];
    let answer = client.read(&mut byte);
    assert!(
        matches!(&answer, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client is reset: {answer:?}"
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "given up too soon: {waited:?}");
    r.wait_no_flows();
}
