//! Real QEMU guests (TCG) on a network with a gateway: both get their address from
//! vmfabric's DHCP, and one resolves and pings the other by name; a guest fetches a
//! page from a host loopback server through the host-access address and serves one
//! that the host fetches through a TCP forward. Needs QEMU and the
//! guest image (guest/build.sh); skips with a reason otherwise, unless
//! VMFABRIC_REQUIRE_ALL_TESTS=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fabric::Mac;
use testkit::Guest;
use vm::{Nic, NicBackend};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn guest_dir() -> Option<PathBuf> {
    let skip = |why: &str| {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here but {why}"
        );
        eprintln!("SKIP: {why}");
        None
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return skip("qemu-system-x86_64 is not installed");
    }
    let dir = std::env::var_os("VMFABRIC_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace().join("target/guest"));
    match Command::new(workspace().join("guest/build.sh")).arg(&dir).status() {
        Ok(s) if s.success() => Some(dir),
        _ => skip("the guest image could not be built"),
    }
}

/// A guest on a unixgram port of the switch (at `switch_path`).
fn boot(image: &Path, work: &Path, name: &str, switch_path: PathBuf, cmd: Option<&str>, extra: &[&str]) -> Guest {
    let nic = Nic {
        backend: NicBackend::Unixgram {
            switch_path,
            guest_path: work.join(format!("{name}.guest.sock")),
        },
        mac: Mac::derived(&["t", name]),
    };
    Guest::boot(image, work.join(format!("{name}.log")), nic, name, cmd, extra)
}

#[test]
fn guests_get_leases_and_find_each_other_by_name() {
    let Some(image) = guest_dir() else { return };
    let work = std::env::temp_dir().join(format!("gw-guests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let common::Lab { gw, sw, rt: _rt } = common::lab("lab", "10.240.0.0/24", |_| {});
    let (a_path, b_path) = (work.join("alpha.sock"), work.join("beta.sock"));
    sw.add_unixgram_port("lab", "alpha", &a_path).unwrap();
    sw.add_unixgram_port("lab", "beta", &b_path).unwrap();

    let mut alpha = boot(&image, &work, "alpha", a_path, None, &[]);
    let ready = alpha.wait_for("VMFABRIC_READY");
    let alpha_ip = gw.resolve("alpha").expect("alpha's lease named it");
    assert!(ready.contains(&format!("VMFABRIC_READY - {alpha_ip} ")), "{ready}");
    let mut beta = boot(
        &image,
        &work,
        "beta",
        b_path,
        Some("nslookup alpha && ping -c 2 -W 3 alpha"),
        &[],
    );
    let out = beta.wait_for("VMFABRIC_CMD_EXIT");
    assert!(out.contains("VMFABRIC_CMD_EXIT 0"), "{out}");
    assert!(
        out.contains(&format!("Address: {alpha_ip}")),
        "beta resolved alpha:\n{out}"
    );
    let leases = gw.leases();
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(leases.iter().any(|l| l.hostname.as_deref() == Some("beta")));
}

#[test]
fn a_guest_fetches_from_the_host_and_serves_the_host_through_a_forward() {
    use std::io::{Read, Write};
    let Some(image) = guest_dir() else { return };
    let work = std::env::temp_dir().join(format!("gw-nat-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let common::Lab { gw, sw, rt: _rt } = common::lab("natlab", "10.241.0.0/24", |cfg| {
        cfg.host_access = Some(cfg.default_host_access());
    });
    // A web server on host loopback only.
    let web_port = testkit::loopback_web_server("page from the host loopback");
    let path = work.join("web.sock");
    sw.add_unixgram_port("natlab", "web", &path).unwrap();
    let cmd = format!("wget -q -O - http://10.241.0.254:{web_port}/ && echo");
    let mut guest = boot(&image, &work, "web", path, Some(&cmd), &["VMF_HTTP=1", "VMF_END=hang"]);
    let out = guest.wait_for("VMFABRIC_CMD_EXIT");
    assert!(out.contains("page from the host loopback"), "{out}");
    assert!(out.contains("VMFABRIC_CMD_EXIT 0"), "{out}");

    let ip = gw.resolve("web").expect("the guest has a lease");
    let fw = gw
        .add_forward(
            gateway::forward::Protocol::Tcp,
            "127.0.0.1:0".parse().unwrap(),
            std::net::SocketAddrV4::new(ip, 80).into(),
        )
        .unwrap();
    let mut s = std::net::TcpStream::connect(fw.host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.contains("hello from vmfabric guest"), "{page}");
}
