//! Live capture end to end: `vmfabric capture` against a daemon while two ports talk;
//! tshark reads the file and counts the frames. Needs tshark.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod harness;

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn capture_while_traffic_flows_and_tshark_reads_it() {
    if Command::new("tshark")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs tshark"
        );
        eprintln!("SKIP capture_while_traffic_flows_and_tshark_reads_it: needs tshark (apt-get install tshark)");
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("vmf-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = harness::start(&dir, None);
    let (daemon, socket) = (&d.daemon, &d.socket);
    daemon
        .create_network(
            vmfabric::model::NetworkSpec {
                gateway: false,
                ..vmfabric::model::NetworkSpec::new(
                    vmfabric::model::Name::new("network", "cap").unwrap(),
                    "10.93.0.0/24".parse().unwrap(),
                )
            },
            false,
        )
        .unwrap();
    let (_, a) = daemon.switch().add_port("cap", "a").unwrap();
    let (_, b) = daemon.switch().add_port("cap", "b").unwrap();
    let (a, b) = (
        std::os::unix::net::UnixDatagram::from(a),
        std::os::unix::net::UnixDatagram::from(b),
    );
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let pcap = dir.join("out.pcap");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmfabric"))
        .args(["capture", "cap", "-w"])
        .arg(&pcap)
        .arg("--socket")
        .arg(socket)
        .spawn()
        .unwrap();
    wait_until("the pcap header", || file_len(&pcap) >= 24);
    let mut frame = vec![0xff; 6];
    frame.extend([0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    frame.resize(100, 0x42);
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        a.send(&frame).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), 100);
    }
    // 24-byte file header, then a 16-byte record header and 100 bytes per frame.
    wait_until("ten frames in the file", || file_len(&pcap) >= 24 + 10 * 116);
    child.kill().unwrap();
    child.wait().unwrap();
    let out = Command::new("tshark").arg("-r").arg(&pcap).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 10, "{}", String::from_utf8_lossy(&out.stdout));

    // pcapng: one interface per port, so the whole network's capture says which port
    // each frame came in through.
    let name = |n: &str| vmfabric::model::Name::new("port", n).unwrap();
    let (alpha, alpha_fd) = daemon.add_socketpair_port("cap", &name("alpha"), None, false).unwrap();
    let (beta, beta_fd) = daemon.add_socketpair_port("cap", &name("beta"), None, false).unwrap();
    let (alpha_fd, beta_fd) = (
        std::os::unix::net::UnixDatagram::from(alpha_fd),
        std::os::unix::net::UnixDatagram::from(beta_fd),
    );
    let pcapng = dir.join("out.pcapng");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmfabric"))
        .args(["capture", "cap", "--pcapng", "-w"])
        .arg(&pcapng)
        .arg("--socket")
        .arg(socket)
        .spawn()
        .unwrap();
    wait_until("the section header", || file_len(&pcapng) >= 28);
    let from = |mac: fabric::Mac| {
        let mut f = vec![0xff; 6];
        f.extend(mac.0);
        f.extend([0x88, 0xb5]);
        f.resize(80, 0x42);
        f
    };
    for _ in 0..3 {
        alpha_fd.send(&from(alpha.record.mac)).unwrap();
        beta_fd.send(&from(beta.record.mac)).unwrap();
    }
    let before = file_len(&pcapng);
    // Six blocks of 80-byte frames and two interface blocks at least.
    wait_until("six frames in the file", || file_len(&pcapng) >= before + 6 * 112);
    child.kill().unwrap();
    child.wait().unwrap();
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&pcapng)
        .args(["-T", "fields", "-e", "frame.interface_name"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text.lines().collect();
    assert_eq!(names.iter().filter(|n| **n == "cap/alpha").count(), 3, "{text}");
    assert_eq!(names.iter().filter(|n| **n == "cap/beta").count(), 3, "{text}");
    d.stop();
}
