//! Boot to Ready and memory per VM: vmfabric's runner on a vmfabric network against
//! the same guest booted by hand by QEMU on its own user-mode network (slirp), side
//! by side in one run. Both wait for the same thing: the guest's readiness marker on
//! the serial console after it leased an address by DHCP. Memory is the QEMU process's
//! proportional set size (Pss, /proc/PID/smaps_rollup) once the guest is Ready.
//!
//! Guests: the test guest (guest/build.sh, 96 MiB) and, as root with mmdebstrap, the
//! Debian disk guest (guest/build-debian.sh, 512 MiB, a copy-on-write overlay).
//!
//! Run: `cargo bench -p vmfabric --bench vm_boot` (BENCH_REPS boots per cell, default 3;
//! VMFABRIC_GUEST_DIR and VMFABRIC_DEBIAN_GUEST_DIR as for the tests).

#[path = "../../vm/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmfabric::control::vms::VmRequest;
use vmfabric::control::Control;

struct Guest {
    label: &'static str,
    memory_mib: u32,
    kernel: PathBuf,
    initrd: PathBuf,
    root_disk: Option<PathBuf>,
}

/// The QEMU process's Pss in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One boot by the daemon's runner: seconds to Ready, and QEMU's Pss then.
fn boot_vmfabric(ctl: &Arc<Control>, g: &Guest, n: usize) -> (f64, u64) {
    let name = format!("bench{n}");
    let mut req = VmRequest::new(&name, "default");
    req.memory_mib = g.memory_mib;
    req.kernel = Some(g.kernel.clone());
    req.initrd = Some(g.initrd.clone());
    req.root_disk = g.root_disk.clone().map(|path| vm::Disk {
        path,
        mode: vm::DiskMode::Overlay,
    });
    let t = Instant::now();
    ctl.vms().run(&**ctl, req).expect("the VM starts");
    let deadline = t + Duration::from_secs(600);
    loop {
        let v = ctl.vms().get(&name).unwrap();
        match v.state.as_str() {
            "ready" => {
                let secs = t.elapsed().as_secs_f64();
                let pss = v.pid.and_then(pss_kib).unwrap_or(0);
                ctl.vms().stop(&**ctl, &name).unwrap();
                return (secs, pss);
            }
            "failed" | "stopped" => panic!("{name}: {v:?}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{name} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One boot by hand: QEMU with `-netdev user`, the console scanned for the marker.
fn boot_slirp(g: &Guest, work: &Path, n: usize) -> (f64, u64) {
    let console = work.join(format!("slirp{n}.console"));
    let _ = std::fs::remove_file(&console);
    let mut q = vm::QemuConfig::new(
        g.kernel.clone(),
        Some(g.initrd.clone()),
        vm::Serial::File(console.clone()),
    );
    q.memory_mib = g.memory_mib;
    q.cmdline.extend(vm::GuestCmdline::dhcp(&format!("slirp{n}")).args());
    q.cmdline.push(format!("VMF_NONCE=slirp{n}"));
    let overlay = work.join(format!("slirp{n}.qcow2"));
    if let Some(base) = &g.root_disk {
        q.root_disk = Some(
            vm::storage::attach(
                &vm::Disk {
                    path: base.clone(),
                    mode: vm::DiskMode::Overlay,
                },
                &overlay,
            )
            .unwrap(),
        );
    }
    let mut args = q.args();
    args.extend([
        "-netdev".into(),
        "user,id=n0,restrict=on".into(),
        "-device".into(),
        "virtio-net-device,netdev=n0".into(),
    ]);
    let t = Instant::now();
    let mut child = Command::new(&q.binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = format!("VMFABRIC_READY slirp{n} ");
    let deadline = t + Duration::from_secs(600);
    loop {
        let text = std::fs::read(&console).unwrap_or_default();
        if String::from_utf8_lossy(&text).lines().any(|l| l.starts_with(&marker)) {
            let secs = t.elapsed().as_secs_f64();
            let pss = pss_kib(child.id()).unwrap_or(0);
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&overlay);
            return (secs, pss);
        }
        assert!(Instant::now() < deadline, "the slirp guest never became ready");
        assert!(child.try_wait().unwrap().is_none(), "QEMU ended: {}", console.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let Some(image) = common::guest_dir() else { return };
    let mut guests = vec![Guest {
        label: "test guest (initramfs)",
        memory_mib: 96,
        kernel: image.join("vmlinuz"),
        initrd: image.join("initramfs.cpio.gz"),
        root_disk: None,
    }];
    if let Some(deb) = common::debian_guest_dir() {
        guests.push(Guest {
            label: "Debian 12 (systemd, cloud-init)",
            memory_mib: 512,
            kernel: deb.join("vmlinuz"),
            initrd: deb.join("initrd.img"),
            root_disk: Some(deb.join("disk.raw")),
        });
    }
    let work = common::workdir("bench-vm-boot");
    let ctl = Control::start_with_guests(work.join("state"), work.join("run"), Some(image.clone())).unwrap();
    let dirs = guests
        .iter()
        .flat_map(|g| g.root_disk.iter().chain([&g.kernel]))
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    ctl.vms().allow_paths(dirs);
    println!("accelerator: {:?} ({})", vm::Accel::detect().0, vm::Accel::detect().1);
    println!("| guest | runner | boot to Ready, s (median of {reps}) | QEMU Pss at Ready, MiB |");
    println!("|---|---|---|---|");
    for g in &guests {
        // Interleaved, so a slow spell of the machine hits both.
        let (mut vf, mut sl) = (Vec::new(), Vec::new());
        for n in 0..reps {
            vf.push(boot_vmfabric(&ctl, g, n));
            sl.push(boot_slirp(g, &work, n));
        }
        for (runner, v) in [("vmfabric vm run", vf), ("QEMU -netdev user (by hand)", sl)] {
            let secs = median(v.iter().map(|(s, _)| *s).collect());
            let pss = median(v.iter().map(|(_, p)| *p as f64 / 1024.0).collect());
            println!("| {} | {runner} | {secs:.1} | {pss:.0} |", g.label);
        }
    }
}
