//! A real distribution on a vmfabric network (root: the image is built by mmdebstrap;
//! QEMU under TCG here): Debian 12 boots from a copy-on-write overlay of its root disk,
//! configures its NIC by DHCP from the gateway (systemd-networkd), takes its hostname
//! and root's SSH key from the cloud-init seed the runner writes, and its machine id
//! from the runner. Reached over SSH through a port forward, it reads a file from a
//! shared directory, writes one to a read-write share and is refused writing a
//! read-only one (virtio-fs where the host has virtiofsd, as in CI; else virtio-9p). One boot serves all of it (it takes a minute or two under TCG).

#[path = "../../vm/tests/common/mod.rs"]
mod common;

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn ssh(key: &std::path::Path, port: u16, script: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string(), "root@127.0.0.1", script])
        .output()
        .expect("ssh runs (openssh-client)")
}

#[test]
fn a_debian_disk_guest_is_configured_by_dhcp_and_cloud_init_and_uses_its_shares() {
    let Some(debian) = common::debian_guest_dir() else {
        return;
    };
    let dir = common::workdir("debian-guest");
    let d = harness::start(&dir, None);
    let shared = dir.join("shared");
    for sub in ["rw", "ro"] {
        std::fs::create_dir_all(shared.join(sub)).unwrap();
    }
    std::fs::write(shared.join("ro/from-host.txt"), "written by the host\n").unwrap();
    d.daemon.vms().allow_paths(vec![debian.clone(), shared.clone()]);
    let key = dir.join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmfabric-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let user_data = format!(
        "#cloud-config\nhostname: deb1\ndisable_root: false\nusers: []\nssh_authorized_keys:\n  - {}\n",
        public.trim()
    );
    let base_before = std::fs::metadata(debian.join("disk.raw")).unwrap().modified().unwrap();

    let started = Instant::now();
    let (s, v) = d.call(
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "deb1",
            "network": "default",
            "memory_mib": 512,
            "kernel": debian.join("vmlinuz"),
            "initrd": debian.join("initrd.img"),
            "root_disk": {"path": debian.join("disk.raw"), "mode": "overlay"},
            "shares": [
                {"host": shared.join("rw"), "tag": "rw"},
                {"host": shared.join("ro"), "tag": "ro", "read_only": true},
            ],
            "cloud_init": {"user_data": user_data},
        })),
    );
    assert_eq!(s, 201, "{v}");
    let deadline = Instant::now() + Duration::from_secs(420);
    let vm: Value = loop {
        let (_, v) = d.call("GET", "/v1/vms/deb1", None);
        if ["ready", "failed", "stopped"].contains(&v["state"].as_str().unwrap_or("")) {
            break v;
        }
        assert!(Instant::now() < deadline, "deb1 never became ready: {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let (_, console) = d.call("GET", "/v1/vms/deb1/logs", None);
    assert_eq!(vm["state"], "ready", "{vm}\n{}", console.as_str().unwrap_or(""));
    eprintln!("deb1 ready in {:.0?} (TCG)", started.elapsed());
    let ip = vm["ip"].as_str().unwrap().to_string();

    let (s, fw) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": format!("{ip}:22")})),
    );
    assert_eq!(s, 201, "{fw}");
    let port: u16 = fw["host"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // virtio-fs where the host has virtiofsd, else virtio-9p: the mount says which.
    let (fs_type, mount) = match vm::storage::find_virtiofsd() {
        Some(_) => ("virtiofs", "mount -t virtiofs"),
        None => ("9p", "mount -t 9p -o trans=virtio,version=9p2000.L"),
    };
    eprintln!("shares over {fs_type}");
    let script = format!(
        "hostname; cat /etc/machine-id; \
        mkdir -p /mnt/rw /mnt/ro; \
        {mount} rw /mnt/rw && {mount} ro /mnt/ro && \
        grep -c ' /mnt/r[wo] {fs_type} ' /proc/mounts && \
        cat /mnt/ro/from-host.txt && \
        echo 'written by the guest' > /mnt/rw/from-guest.txt && sync && echo WROTE_RW; \
        touch /mnt/ro/nope 2>/dev/null || echo RO_REFUSED; true"
    );
    let script = script.as_str();
    // sshd may still be taking its host keys when the marker is out: a few tries.
    let mut out = ssh(&key, port, script);
    for _ in 0..10 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
        out = ssh(&key, port, script);
    }
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ssh: {}\n{said}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, inspect) = d.call("GET", "/v1/vms/deb1/inspect", None);
    let machine_id = inspect["request"]["machine_id"].as_str().unwrap().to_string();
    let mut lines = said.lines();
    assert_eq!(lines.next(), Some("deb1"), "cloud-init set the hostname:\n{said}");
    assert_eq!(
        lines.next(),
        Some(machine_id.as_str()),
        "the runner's machine id:\n{said}"
    );
    assert_eq!(lines.next(), Some("2"), "both shares mounted as {fs_type}:\n{said}");
    for expected in ["written by the host", "WROTE_RW", "RO_REFUSED"] {
        assert!(said.contains(expected), "{expected}:\n{said}");
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("rw/from-guest.txt")).unwrap(),
        "written by the guest\n"
    );
    assert!(!shared.join("ro/nope").exists());
    // The gateway leased the address the guest's networkd took.
    let (_, leases) = d.call("GET", "/v1/networks/default/leases", None);
    assert!(
        leases.as_array().unwrap().iter().any(|l| l["ip"] == ip.as_str()),
        "{leases}"
    );

    let (s, _) = d.call("DELETE", "/v1/vms/deb1", None);
    assert_eq!(s, 200);
    assert_eq!(
        std::fs::metadata(debian.join("disk.raw")).unwrap().modified().unwrap(),
        base_before,
        "the base image was never written"
    );
}
