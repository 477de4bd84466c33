//! Real QEMU guests (TCG) attached to switch ports: the guest's DHCP DISCOVER, sent
//! from its virtio NIC, must arrive at another port of the same network.
//!
//! Needs qemu-system-x86_64 and the guest image (guest/build.sh, which needs apt).
//! Without them the tests say why and skip, unless VMFABRIC_REQUIRE_ALL_TESTS=1 (set by
//! the project's test command, so CI can never skip them silently).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fabric::{Mac, NetworkConfig, Switch, SwitchConfig};
use vm::{Nic, NicBackend, QemuConfig, Serial};

mod common;
use common::{guest_dir, workdir};

struct Guest {
    child: Child,
    log: PathBuf,
}

impl Guest {
    fn boot(guest: &Path, work: &Path, nic: Nic, extra: &[&str]) -> Guest {
        let log = work.join("serial.log");
        let mut q = QemuConfig::new(
            guest.join("vmlinuz"),
            Some(guest.join("initramfs.cpio.gz")),
            Serial::File(log.clone()),
        );
        q.memory_mib = 96;
        q.nics.push(nic);
        q.cmdline.extend([
            "VMF_IP=dhcp".to_string(),
            "VMF_END=hang".into(),
            "VMF_HOSTNAME=probe".into(),
        ]);
        q.cmdline.extend(extra.iter().map(|s| s.to_string()));
        let child = q
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu");
        Guest { child, log }
    }

    fn serial_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `f` is a DHCP DISCOVER from `client`.
fn is_dhcp_discover(f: &[u8], client: Mac) -> bool {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] || f[6..12] != client.0 {
        return false;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 17 || ip.len() < ihl + 8 + 240 {
        return false;
    }
    let udp = &ip[ihl..];
    let bootp = &udp[8..];
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    if dport != 67 || bootp[0] != 1 || bootp[236..240] != [99, 130, 83, 99] {
        return false;
    }
    // Walk the options for message type 53 = DISCOVER (1).
    let mut opts = &bootp[240..];
    while let [code, rest @ ..] = opts {
        match code {
            0 => opts = rest,
            255 => break,
            _ => {
                let Some((&len, rest)) = rest.split_first() else {
                    break;
                };
                let len = usize::from(len);
                if rest.len() < len {
                    break;
                }
                if *code == 53 && len == 1 {
                    return rest[0] == 1;
                }
                opts = &rest[len..];
            }
        }
    }
    false
}

fn wait_for_discover(observer: &UnixDatagram, client: Mac, guest: &mut Guest) {
    observer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = vec![0u8; 70000];
    let mut frames = 0;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = guest.child.try_wait() {
            panic!("qemu exited early ({status}); serial:\n{}", guest.serial_tail());
        }
        if let Ok(n) = observer.recv(&mut buf) {
            frames += 1;
            if is_dhcp_discover(&buf[..n], client) {
                return;
            }
        }
    }
    panic!(
        "no DHCP DISCOVER from {client} in 120 s ({frames} other frames); serial:\n{}",
        guest.serial_tail()
    );
}

#[test]
fn guest_on_a_unixgram_port_is_heard_on_the_network() {
    let Some(guest) = guest_dir() else { return };
    let work = workdir("dgram");
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network("default", NetworkConfig::default()).unwrap();
    let switch_path = work.join("port.sock");
    let port = sw.add_unixgram_port("default", "guest", &switch_path).unwrap();
    let (_, observer) = sw.add_port("default", "observer").unwrap();
    let observer = UnixDatagram::from(observer);
    let mac = Mac::derived(&["default", "guest"]);
    let nic = Nic {
        backend: NicBackend::Unixgram {
            switch_path,
            guest_path: work.join("guest.sock"),
        },
        mac,
    };
    let mut g = Guest::boot(&guest, &work, nic, &[]);
    wait_for_discover(&observer, mac, &mut g);
    assert_eq!(sw.is_port_up(port), Some(true), "the port learned QEMU's address");
    assert!(sw
        .mac_table("default")
        .unwrap()
        .iter()
        .any(|e| e.mac == mac && e.port == port));
}

#[test]
fn guest_on_a_stream_port_is_heard_on_the_network() {
    let Some(guest) = guest_dir() else { return };
    let work = workdir("stream");
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network("default", NetworkConfig::default()).unwrap();
    let path = work.join("port.stream");
    let port = sw.add_stream_port("default", "guest", &path).unwrap();
    let (_, observer) = sw.add_port("default", "observer").unwrap();
    let observer = UnixDatagram::from(observer);
    let mac = Mac::derived(&["default", "guest-stream"]);
    let mut g = Guest::boot(
        &guest,
        &work,
        Nic {
            backend: NicBackend::Stream { path },
            mac,
        },
        &[],
    );
    wait_for_discover(&observer, mac, &mut g);
    assert_eq!(sw.is_port_up(port), Some(true));
}

/// A guest on a vhost-user port: its frames come out of its virtqueues (in memory it
/// shares with the switch) onto the network; the port goes down with its VMM and up
/// again with the next one on the same path.
#[test]
fn guest_on_a_vhost_user_port_is_heard_on_the_network() {
    let Some(guest) = guest_dir() else { return };
    let work = workdir("vhost-user");
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network("default", NetworkConfig::default()).unwrap();
    let path = work.join("port.vhost");
    let port = sw.add_vhost_user_port("default", "guest", &path).unwrap();
    let (_, observer) = sw.add_port("default", "observer").unwrap();
    let observer = UnixDatagram::from(observer);
    let mac = Mac::derived(&["default", "guest-vhost"]);
    let mut g = Guest::boot(
        &guest,
        &work,
        Nic {
            backend: NicBackend::VhostUser { path, queues: 1 },
            mac,
        },
        &[],
    );
    wait_for_discover(&observer, mac, &mut g);
    assert_eq!(sw.is_port_up(port), Some(true), "the VMM connected");
    let c = sw.port_counters(port).unwrap();
    assert!(c.rx_frames > 0, "{c:?}");
    assert_eq!(c.total_drops(), 0, "{c:?}");
    drop(g);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sw.is_port_up(port) == Some(true) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sw.is_port_up(port), Some(false), "down once QEMU is gone");
    // A new VMM on the same port, asking for two queue pairs: a fresh device state,
    // heard again.
    let mut again = Guest::boot(
        &guest,
        &work,
        Nic {
            backend: NicBackend::VhostUser {
                path: work.join("port.vhost"),
                queues: 2,
            },
            mac,
        },
        &[],
    );
    wait_for_discover(&observer, mac, &mut again);
    assert_eq!(sw.is_port_up(port), Some(true), "up with the new VMM");
    sw.remove_port(port).unwrap();
    assert!(!work.join("port.vhost").exists(), "the port's socket goes with it");
}
