//! Rootless mode: the daemon as an unprivileged user (nobody) serves a userspace
//! network to a real QEMU guest it runs itself (TCG: nobody cannot open /dev/kvm here)
//! with DHCP, DNS (local and forwarded) and TCP NAT to the host's loopback; what needs
//! privileges is refused with a message that says so. Needs root (to become nobody),
//! setpriv, dnsmasq and the guest image.

#[path = "../../vm/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vmfabric");
const NOBODY: &str = "65534";

/// `args` run as nobody, with no supplementary groups.
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ]);
    c.args(args);
    c
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    let mut a = vec![BIN];
    a.extend(args);
    as_nobody(&a)
        .env("VMFABRIC_SOCKET", dir.join("api.sock"))
        .output()
        .unwrap()
}

#[test]
fn an_unprivileged_daemon_serves_a_real_guest() {
    let tools = testkit::is_root() && Command::new("setpriv").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(tools, "rootless: needs root (to become nobody) and setpriv") {
        return;
    }
    let Some(image) = common::guest_dir() else { return };
    let dir = std::env::temp_dir().join(format!("vmf-rootless-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    testkit::run(&["chown", &format!("{NOBODY}:{NOBODY}"), dir.to_str().unwrap()]);
    let port = testkit::loopback_web_server("hello from the host, to nobody's guest");
    let upstream = testkit::loopback_resolver(&dir, "outside.test", "192.0.2.7");
    let upstream_port = upstream.port;

    let daemon = as_nobody(&[BIN, "serve", "--guest-dir", image.to_str().unwrap()])
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = testkit::Killed(daemon);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert!(uid.split_whitespace().skip(1).all(|u| u == NOBODY), "{uid}");

    let ok = |args: &[&str]| {
        let out = cli(&dir, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "network",
        "create",
        "r",
        "--subnet",
        "10.99.0.0/24",
        "--host-access",
        "--upstream",
        &format!("127.0.0.1:{upstream_port}"),
    ]);
    let cmd = format!(
        "nslookup -type=a outside.test && nslookup -type=a gateway && wget -qO- http://host.vm.internal:{port}/"
    );
    ok(&["vm", "run", "--net", "r", "--name", "g", "--wait", "--", &cmd]);
    // Ready is when its network is up; the command runs on until it powers off.
    let deadline = Instant::now() + Duration::from_secs(180);
    let logs = loop {
        let logs = ok(&["vm", "logs", "g"]);
        if logs.contains("VMFABRIC_CMD_EXIT") || Instant::now() > deadline {
            break logs;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for want in [
        "192.0.2.7",
        "10.99.0.1",
        "hello from the host, to nobody's guest",
        "VMFABRIC_CMD_EXIT 0",
    ] {
        assert!(
            logs.contains(want),
            "{want:?} missing from the guest's console:\n{logs}"
        );
    }

    // What needs privileges says so.
    let tap = cli(&dir, &["port", "add", "r", "t", "--kind", "tap"]);
    let why = String::from_utf8_lossy(&tap.stderr);
    assert!(!tap.status.success() && why.contains("CAP_NET_ADMIN"), "{why}");
    let kernel = cli(
        &dir,
        &["network", "create", "k", "--subnet", "10.98.0.0/24", "--mode", "kernel"],
    );
    let why = String::from_utf8_lossy(&kernel.stderr);
    assert!(!kernel.status.success() && why.contains("CAP_NET_ADMIN"), "{why}");
    drop(daemon);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    assert!(
        log.contains("unprivileged"),
        "the daemon says at start what an unprivileged daemon cannot do:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
