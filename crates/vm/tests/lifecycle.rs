//! A VM's lifecycle with a real QEMU guest (TCG): Running, then Ready with the address
//! its console reports under this boot's nonce; a stop ends in Stopped; a VMM killed
//! from outside ends in Failed with its exit status and the console's last lines.

mod common;

use std::time::Duration;

use fabric::{Mac, NetworkConfig, Switch, SwitchConfig};
use vm::{Nic, NicBackend, QemuVm, VmConfig, VmState};

fn config(
    image: &std::path::Path,
    work: &std::path::Path,
    name: &str,
    ip: &str,
    switch_path: std::path::PathBuf,
) -> VmConfig {
    VmConfig {
        name: name.into(),
        namespace: "test".into(),
        kernel: image.join("vmlinuz"),
        initramfs: Some(image.join("initramfs.cpio.gz")),
        root_disk: None,
        data_disks: vec![],
        shares: vec![],
        vsock_cid: None,
        cloud_init: None,
        machine_id: None,
        cpus: 1,
        memory_mib: 96,
        attachments: vec![Nic {
            backend: NicBackend::Unixgram {
                switch_path,
                guest_path: work.join(format!("{name}.guest.sock")),
            },
            mac: Mac::derived(&["test", name]),
        }],
        serial_log: work.join(format!("{name}.console")),
        cmdline: vec![format!("VMF_IP={ip}/24"), "VMF_END=hang".into()],
        netns: None,
    }
}

#[test]
fn ready_then_stopped_and_a_killed_vmm_is_failed() {
    let Some(image) = common::guest_dir() else { return };
    let work = common::workdir("lifecycle");
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let (pa, pb) = (work.join("a.sock"), work.join("b.sock"));
    sw.add_unixgram_port("n", "a", &pa).unwrap();
    sw.add_unixgram_port("n", "b", &pb).unwrap();

    let mut a = QemuVm::start(&config(&image, &work, "a", "10.96.0.5", pa), &work).unwrap();
    let mut b = QemuVm::start(&config(&image, &work, "b", "10.96.0.6", pb), &work).unwrap();
    assert!(matches!(a.state(), VmState::Running | VmState::Starting));
    let ip_a = "10.96.0.5".parse().unwrap();
    let ready = |s: &VmState| !matches!(s, VmState::Running | VmState::Starting);
    assert_eq!(
        a.wait_for(Some(ip_a), Duration::from_secs(120), ready),
        VmState::Ready { ip: ip_a }
    );
    let s = b.wait_for(None, Duration::from_secs(120), ready);
    assert_eq!(
        s,
        VmState::Ready {
            ip: "10.96.0.6".parse().unwrap()
        }
    );

    // Stop: powerdown over QMP (this guest ignores it), then SIGTERM.
    let pid_a = a.process().unwrap();
    assert_eq!(a.stop(Duration::from_secs(3)), VmState::Stopped);
    assert!(!pid_a.is_alive(), "the VMM is gone");

    // Killed from outside: Failed, with the reason and the console's tail.
    let pid_b = b.process().unwrap();
    assert!(pid_b.signal(rustix::process::Signal::KILL).unwrap());
    let s = b.wait_for(None, Duration::from_secs(20), |s| matches!(s, VmState::Failed { .. }));
    let VmState::Failed { reason } = s else { panic!("{s:?}") };
    assert!(
        reason.contains("signal: 9") && reason.contains("VMFABRIC_READY"),
        "{reason}"
    );
}

#[test]
fn a_bad_config_never_starts() {
    let work = common::workdir("badconfig");
    let mut c = config(
        std::path::Path::new("/nonexistent"),
        &work,
        "x",
        "10.96.0.9",
        work.join("s.sock"),
    );
    c.memory_mib = 32;
    let Err(e) = QemuVm::start(&c, &work) else {
        panic!("started")
    };
    assert!(e.to_string().contains("32 MiB"), "{e}");
}

/// A VMM that will not start says why: QEMU's own message is in the Failed reason (and
/// in the log beside the console).
#[test]
fn a_vmm_that_will_not_start_says_why() {
    // (The image is not booted; this is the skip rule for tests that need QEMU.)
    let Some(_) = common::guest_dir() else { return };
    let work = common::workdir("nostart");
    // A file that exists but is no kernel: validation passes, QEMU refuses it.
    let junk = work.join("not-a-kernel");
    std::fs::write(&junk, b"junk").unwrap();
    let mut c = config(&work, &work, "x", "10.96.0.9", work.join("s.sock"));
    c.kernel = junk.clone();
    c.initramfs = Some(junk);
    let mut vm = QemuVm::start(&c, &work).unwrap();
    let s = vm.wait_for(None, Duration::from_secs(20), |s| matches!(s, VmState::Failed { .. }));
    let VmState::Failed { reason } = s else { panic!("{s:?}") };
    assert!(reason.contains("QEMU said") && reason.contains("kernel"), "{reason}");
    let log = std::fs::read_to_string(vm::driver::stderr_log(&c.serial_log)).unwrap();
    assert!(log.contains("kernel"), "{log}");
}

/// A start that fails half-way (the second overlay's base is no usable qcow2) takes the
/// files it already made (the first overlay) with it.
#[test]
fn a_failed_start_leaves_no_scratch_files() {
    // The skip rule for tests that need QEMU's tools.
    let Some(_) = common::guest_dir() else { return };
    let work = common::workdir("scratch");
    let good = work.join("good.raw");
    std::fs::write(&good, vec![0u8; 1 << 20]).unwrap();
    let broken = work.join("broken.qcow2");
    std::fs::write(&broken, b"QFI\xfbthis is no qcow2 header").unwrap();
    let mut c = config(&work, &work, "x", "10.96.0.9", work.join("s.sock"));
    c.kernel = good.clone();
    c.initramfs = Some(good.clone());
    for path in [good, broken] {
        c.data_disks.push(vm::Disk {
            path,
            mode: vm::DiskMode::Overlay,
        });
    }
    let Err(e) = QemuVm::start(&c, &work) else {
        panic!("started on a broken base image")
    };
    assert!(e.to_string().contains("broken.qcow2"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".files"))
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}
