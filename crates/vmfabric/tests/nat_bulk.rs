//! 200 MiB each way through NAT between a QEMU guest (TCG) on a vhost-user port, its
//! offloads on, and servers on host loopback reached through the host-access address:
//! the guest's 64 KiB segments are cut in software for the gateway, the gateway's
//! stack re-originates the bytes from host sockets, and both ends' SHA-256 agree.
//! Needs QEMU and the test guest.

#[path = "../../vm/tests/common/mod.rs"]
mod common;

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;

const MIB: u32 = 200;

/// Receives one connection to its end on 127.0.0.1 (the port it prints first), then
/// prints the byte count and SHA-256.
const RECEIVER: &str = r#"
import hashlib, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1); s.settimeout(600)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(120); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"#;

#[test]
fn a_vhost_user_guest_moves_200_mib_each_way_through_nat() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("nat-bulk");
    let d = harness::start(&dir, Some(image));
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "bulk", "subnet": "10.86.0.0/24", "host_access": true})),
    );
    assert_eq!(s, 201, "{v}");

    // Host -> guest: a file served on loopback.
    let served = dir.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let blob = served.join("blob");
    let made = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", blob.display()),
            "bs=1M",
            &format!("count={MIB}"),
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let want_down = harness::sha256_file(&blob);
    // Port 0: the server picks one and says which ("Serving HTTP on 127.0.0.1 port N").
    let mut http = Command::new("python3")
        .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory"])
        .arg(&served)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = BufReader::new(http.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let http_port: u16 = first
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    let _http = testkit::Killed(http);
    // Guest -> host: a receiver that hashes what comes.
    let mut receiver = Command::new("python3")
        .args(["-c", RECEIVER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let up_port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let _receiver = testkit::Killed(receiver);

    // The guest hashes what it fetched, then sends random bytes through a hash of its own.
    let host = "10.86.0.254";
    let cmd = format!(
        "echo \"DOWN $(wget -q -O - http://{host}:{http_port}/blob | sha256sum)\"; \
         mkfifo /tmp/up; sha256sum < /tmp/up > /tmp/up.sum & \
         dd if=/dev/urandom bs=64k count={blocks} 2>/dev/null | tee /tmp/up | nc {host} {up_port}; wait; \
         echo \"UP $(cat /tmp/up.sum)\"",
        blocks = MIB * 16
    );
    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({"name": "mover", "network": "bulk", "vhost_user": true, "cmd": cmd})),
    );
    assert_eq!(s, 201, "{v}");
    let down = d.wait_line("mover", "DOWN ");
    assert!(down.contains(&want_down), "host -> guest: sent {want_down}, got {down}");
    let up = d.wait_line("mover", "UP ");
    let got = lines.next().unwrap().unwrap();
    let want_up = up.split_whitespace().nth(1).unwrap_or("?");
    assert_eq!(
        got,
        format!("{} {want_up}", u64::from(MIB) << 20),
        "guest -> host: the host got what the guest sent"
    );
    d.stop();
}
