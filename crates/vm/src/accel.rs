//! Which accelerator QEMU should use.
//!
//! `/dev/kvm` existing is not enough: on a PVM host (`kvm_pvm` module) it accepts
//! `KVM_CREATE_VM`, but stock guest kernels crash or crawl under it, about 20× slower
//! than TCG. So KVM is chosen only when the device is usable and is not PVM.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The accelerator for this host, and why.
    pub fn detect() -> (Accel, &'static str) {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                Accel::Tcg,
                "/dev/kvm is PVM, which stock guest kernels do not run under",
            );
        }
        match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => (Accel::Kvm, "/dev/kvm is usable"),
            Err(_) => (Accel::Tcg, "/dev/kvm is missing or not accessible"),
        }
    }

    /// QEMU arguments for this accelerator.
    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            // arch-capabilities is masked: some hosts refuse the MSR QEMU would set.
            Accel::Kvm => vec![
                "-accel".into(),
                "kvm".into(),
                "-cpu".into(),
                "host,-arch-capabilities".into(),
            ],
            Accel::Tcg => vec![
                "-accel".into(),
                "tcg,thread=single,tb-size=64".into(),
                "-cpu".into(),
                "max".into(),
            ],
        }
    }
}

/// The host's TSC rate in kHz as /proc/cpuinfo states it. Under TCG a guest's own
/// PIT-based TSC calibration sometimes fails on a busy host and the kernel then hangs;
/// handing it `tsc_early_khz` avoids that.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64).filter(|k| *k > 0)
}
