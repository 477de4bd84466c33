//! The QEMU arguments `port add` prints are what a user pastes: each is booted here as
//! printed, on the usual PCI machine (q35, virtio-net-pci), with the test guest, which
//! must lease an address through it. Userspace unixgram, stream and vhost-user ports
//! (the last a modern virtio-net-pci device, where the runner's is legacy); kernel-mode
//! TAP ports (root). Needs QEMU and the guest image.

#[path = "../../vm/tests/common/mod.rs"]
mod common;

mod harness;

use std::path::Path;

use serde_json::json;

/// Boots the guest on q35 with `printed` (the line `port add` printed, after
/// `qemu-system-x86_64 ...`) as its only NIC; the console once the guest leased.
/// A guest that never leases fails with the console and the daemon's DHCP and port
/// counters for `network` (whether its REQUESTs reached the gateway, and what dropped).
fn boot_printed(d: &harness::Running, network: &str, image: &Path, dir: &Path, name: &str, printed: &str) -> String {
    let mut q = vm::QemuConfig::new(
        image.join("vmlinuz"),
        Some(image.join("initramfs.cpio.gz")),
        vm::Serial::File(dir.join(format!("{name}.console"))),
    );
    q.cmdline.extend(vm::GuestCmdline::dhcp(name).args());
    let mut args = q.args();
    // The runner boots microvm guests; users boot the usual machine with a PCI bus.
    let machine = args.iter().position(|a| a == "-M").expect("a machine type") + 1;
    args[machine] = "q35".into();
    args.extend(printed.split_whitespace().map(String::from));
    let child = std::process::Command::new(&q.binary)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.log"))).unwrap())
        .spawn()
        .unwrap();
    let mut guest = testkit::Killed(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let console = std::fs::read_to_string(dir.join(format!("{name}.console"))).unwrap_or_default();
        if console.contains("VMFABRIC_READY") {
            return console;
        }
        let ended = guest.0.try_wait().unwrap().is_some();
        if ended || std::time::Instant::now() > deadline {
            let qemu = std::fs::read_to_string(dir.join(format!("{name}.qemu.log"))).unwrap_or_default();
            let (_, metrics) = d.call("GET", "/metrics", None);
            let label = format!("network=\"{network}\"");
            let counters: Vec<&str> = metrics
                .as_str()
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&label) && (l.contains("dhcp") || l.contains("port_") || l.contains("drop")))
                .collect();
            panic!(
                "the guest on `{printed}` never leased:\n{console}\nQEMU: {qemu}\ncounters:\n{}",
                counters.join("\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn every_printed_qemu_line_boots_a_guest_that_leases() {
    let Some(image) = common::guest_dir() else { return };
    let dir = common::workdir("vmm-lines");
    let d = harness::start(&dir, None);
    let _gone = harness::KernelInstanceGone::of(&dir.join("state"));
    for kind in ["unixgram", "stream", "vhost-user"] {
        let (s, port) = d.call(
            "POST",
            "/v1/networks/default/ports",
            Some(json!({"name": kind, "kind": kind})),
        );
        assert_eq!(s, 201, "{port}");
        let printed = port["vmm"]["qemu"].as_str().unwrap().to_string();
        assert!(printed.contains("virtio-net-pci"), "{printed}");
        // A vhost-user line's shared memory is as large as the guest's (`-m`).
        let printed = printed.replace("size=MEM", &format!("size={}M", vm::QemuConfig::DEFAULT_MEMORY_MIB));
        let console = boot_printed(&d, "default", &image, &dir, kind, &printed);
        let (_, leases) = d.call("GET", "/v1/networks/default/leases", None);
        let lease = leases
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mac"] == port["mac"])
            .unwrap_or_else(|| panic!("no lease for the {kind} port's MAC: {leases}"));
        let ip = lease["ip"].as_str().unwrap();
        assert!(console.contains(ip), "the console names the leased {ip}:\n{console}");
    }
    // A kernel-mode TAP port: QEMU opens the device the daemon made on the bridge.
    if testkit::ready_or_skip(testkit::is_root(), "the kernel-mode TAP line: needs root") {
        let (s, v) = d.call(
            "POST",
            "/v1/networks",
            Some(json!({"name": "kl", "subnet": "10.76.0.0/24", "mode": "kernel"})),
        );
        assert_eq!(s, 201, "{v}");
        let (s, port) = d.call(
            "POST",
            "/v1/networks/kl/ports",
            Some(json!({"name": "tp", "kind": "tap"})),
        );
        assert_eq!(s, 201, "{port}");
        let printed = port["vmm"]["qemu"].as_str().unwrap().to_string();
        assert!(
            printed.contains("-netdev tap,") && printed.contains("virtio-net-pci"),
            "{printed}"
        );
        let console = boot_printed(&d, "kl", &image, &dir, "tp", &printed);
        assert!(console.contains("10.76.0."), "a kernel-mode address:\n{console}");
        let (s, _) = d.call("DELETE", "/v1/networks/kl?force=true", None);
        assert_eq!(s, 204);
    }
    d.stop();
}
