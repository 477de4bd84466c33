//! Helpers shared by the switch's integration tests: frame builders and VM-side
//! endpoints over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use fabric::{Mac, Switch, SwitchEvent};

pub const WAIT: Duration = Duration::from_secs(10);

pub fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0x00, 0x00, 0x00, n])
}

/// An Ethernet frame of `len` bytes (at least 14) with a recognisable payload.
pub fn frame(dst: Mac, src: Mac, len: usize, tag: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend(dst.0);
    f.extend(src.0);
    f.extend([0x88, 0xb5]); // local experimental ethertype
    f.resize(len.max(14), tag);
    f
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend(total.to_be_bytes());
    h.extend([0, 0, 0, 0, 64, proto, 0, 0]);
    h.extend(src.octets());
    h.extend(dst.octets());
    h
}

/// A UDP/IPv4 frame.
pub fn udp_frame(dst: Mac, src: Mac, sip: Ipv4Addr, dip: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst.0);
    f.extend(src.0);
    f.extend([0x08, 0x00]);
    f.extend(ipv4_header(sip, dip, 17, 8));
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend([0, 8, 0, 0]);
    f
}

/// An ARP request from (`sha`, `spa`) for `tpa`, sent from Ethernet source `eth_src`.
pub fn arp_request(eth_src: Mac, sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(Mac::BROADCAST.0);
    f.extend(eth_src.0);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(sha.0);
    f.extend(spa.octets());
    f.extend([0; 6]);
    f.extend(tpa.octets());
    f
}

/// The VM side of a datagram port.
pub struct Dgram(pub UnixDatagram);

impl Dgram {
    pub fn new(fd: OwnedFd) -> Dgram {
        let s = UnixDatagram::from(fd);
        s.set_read_timeout(Some(WAIT)).unwrap();
        Dgram(s)
    }

    pub fn send(&self, f: &[u8]) {
        self.0.send(f).expect("send to the switch");
    }

    /// Next frame, or None after the wait runs out.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        match self.0.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    pub fn expect(&self) -> Vec<u8> {
        self.recv().expect("a frame should have arrived")
    }

    /// Reads frames until one with `tag` in its last byte arrives; returns the frames
    /// before it. Used as a barrier: the switch keeps order per port, so any frame that
    /// was going to arrive before the marker has arrived.
    pub fn until_marker(&self, tag: u8) -> Vec<Vec<u8>> {
        let mut before = Vec::new();
        loop {
            let f = self.expect();
            if f.last() == Some(&tag) && f.len() == 60 {
                return before;
            }
            before.push(f);
        }
    }
}

/// Sends a 60-byte broadcast marker with `tag` from `src` through `via`.
pub fn marker(via: &Dgram, src: Mac, tag: u8) {
    via.send(&frame(Mac::BROADCAST, src, 60, tag));
}

/// The VM side of a stream port.
pub struct Stream(pub UnixStream);

impl Stream {
    pub fn connect(path: &std::path::Path) -> Stream {
        let s = UnixStream::connect(path).expect("connect to the stream port");
        s.set_read_timeout(Some(WAIT)).unwrap();
        Stream(s)
    }

    pub fn send(&mut self, f: &[u8]) {
        self.0.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        self.0.write_all(f).unwrap();
    }

    pub fn recv(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut f).ok()?;
        Some(f)
    }
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for an event matching `pred`, skipping others.
pub fn wait_event(
    events: &std::sync::mpsc::Receiver<SwitchEvent>,
    what: &str,
    pred: impl Fn(&SwitchEvent) -> bool,
) -> SwitchEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ev) if pred(&ev) => return ev,
            Ok(_) => continue,
            Err(_) => panic!("timed out waiting for event: {what}"),
        }
    }
}

pub fn switch() -> Switch {
    Switch::start(Default::default()).expect("start switch")
}

/// A switch with network "n" (default config) and `ports` socketpair ports on it.
pub fn network_with_ports(ports: usize) -> (Switch, Vec<Dgram>) {
    let sw = switch();
    sw.add_network("n", fabric::NetworkConfig::default()).unwrap();
    let eps = (0..ports)
        .map(|i| Dgram::new(sw.add_port("n", &format!("p{i}")).unwrap().1))
        .collect();
    (sw, eps)
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips a test that cannot run here, saying why; fails instead where the project's
/// test command asked for every test to run (VMFABRIC_REQUIRE_ALL_TESTS=1, as in CI).
pub fn skip(why: &str) {
    let test = std::thread::current().name().unwrap_or("test").to_string();
    assert!(
        std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
        "{test} must run here but: {why}"
    );
    eprintln!("SKIP {test}: {why}");
}
