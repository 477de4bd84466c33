//! QEMU command lines for guests whose NICs are vmfabric ports.
//!
//! One `-netdev`/`-device` pair per NIC, the serial console to a file, no firmware
//! menus or default devices, and `-no-reboot` so a guest that powers off or panics
//! ends the QEMU process.

use std::path::PathBuf;
use std::process::Command;

use fabric::Mac;

use crate::accel::{host_tsc_khz, Accel};
use crate::storage::{share_args, AttachedDisk, Share, VirtioFs};

/// How a NIC reaches its vmfabric port.
#[derive(Debug, Clone)]
pub enum NicBackend {
    /// A unixgram port: QEMU binds `guest_path` and sends to `switch_path`.
    Unixgram { switch_path: PathBuf, guest_path: PathBuf },
    /// A stream port: QEMU connects to `path`.
    Stream { path: PathBuf },
    /// An inherited socketpair end (must not be close-on-exec in the child).
    Fd(i32),
    /// A TAP device QEMU opens by name.
    Tap { ifname: String },
    /// A socketpair end a VMM will inherit, for printed arguments: `FD` stands where
    /// its number goes.
    FdToBeGiven,
    /// A vhost-user port: QEMU connects to `path` (and again after the switch
    /// restarts) and shares the guest's memory with it; `queues` pairs (one per vCPU
    /// lets each transmit without a lock in the guest).
    VhostUser { path: PathBuf, queues: u16 },
}

#[derive(Debug, Clone)]
pub struct Nic {
    pub backend: NicBackend,
    pub mac: Mac,
}

impl Nic {
    /// The `-netdev` value for this NIC (QEMU's syntax, written here only).
    pub fn netdev(&self, id: &str) -> String {
        match &self.backend {
            NicBackend::Unixgram {
                switch_path,
                guest_path,
            } => format!(
                "dgram,id={id},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                guest_path.display(),
                switch_path.display()
            ),
            NicBackend::Stream { path } => {
                format!("stream,id={id},server=off,addr.type=unix,addr.path={}", path.display())
            }
            NicBackend::Fd(fd) => format!("dgram,id={id},local.type=fd,local.str={fd}"),
            NicBackend::FdToBeGiven => format!("dgram,id={id},local.type=fd,local.str=FD"),
            NicBackend::Tap { ifname } => {
                format!("tap,id={id},ifname={ifname},script=no,downscript=no")
            }
            NicBackend::VhostUser { queues, .. } if *queues > 1 => {
                format!("vhost-user,id={id},chardev={id}c,queues={queues}")
            }
            NicBackend::VhostUser { .. } => format!("vhost-user,id={id},chardev={id}c"),
        }
    }

    /// The `-chardev` value a vhost-user NIC's netdev names (`ID` + `c`), if it has one.
    pub fn chardev(&self, id: &str) -> Option<String> {
        match &self.backend {
            // QEMU 7.2 takes whole seconds to reconnect (later ones `reconnect-ms`).
            NicBackend::VhostUser { path, .. } => Some(format!("socket,id={id}c,path={},reconnect=1", path.display())),
            _ => None,
        }
    }

    /// Queue pairs beyond the first, as the `-device` option that turns them on.
    fn multiqueue(&self) -> &'static str {
        match self.backend {
            NicBackend::VhostUser { queues, .. } if queues > 1 => ",mq=on",
            _ => "",
        }
    }

    fn is_vhost_user(&self) -> bool {
        matches!(self.backend, NicBackend::VhostUser { .. })
    }
}

/// The guest's memory as a shared memfd: a vhost-user backend (virtiofsd, a vhost-user
/// port) reads and writes the guest's buffers in place, so it must map it too.
fn shared_memory_args(memory_mib: u32) -> [String; 4] {
    [
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// The QEMU arguments that attach a VM with a PCI bus (the usual machine types) to a
/// vmfabric port, as `port add` prints them; the runner's microvm guests use
/// `virtio-net-device` instead (see [`QemuConfig::args`]).
pub fn nic_args(nic: &Nic) -> String {
    // QEMU 7.2 under TCG crashes (SIGSEGV in msix_set_vector_notifiers) starting a
    // vhost backend on an MSI-X virtio-pci device: its vector notifiers assume KVM.
    // Without MSI-X vectors it takes INTx, and runs.
    // With several queue pairs, MSI-X needs a vector per queue, one for config, one spare.
    let vectors = match (&nic.backend, Accel::detect().0) {
        (NicBackend::VhostUser { .. }, Accel::Tcg) => ",vectors=0".to_string(),
        (NicBackend::VhostUser { queues, .. }, _) if *queues > 1 => format!(",vectors={}", 2 * queues + 2),
        _ => String::new(),
    };
    let device = format!(
        "-netdev {} -device virtio-net-pci,netdev=net0,mac={}{}{vectors}",
        nic.netdev("net0"),
        nic.mac,
        nic.multiqueue()
    );
    match nic.chardev("net0") {
        Some(chardev) => format!(
            "-chardev {chardev} {device} -object memory-backend-memfd,id=mem,size=MEM,share=on -machine memory-backend=mem"
        ),
        None => device,
    }
}

/// A guest booted from a kernel, with an initramfs or a root disk or both.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The root filesystem's disk, attached first: the guest's `/dev/vda`.
    pub root_disk: Option<AttachedDisk>,
    /// Further disks, `/dev/vdb` on, in order.
    pub disks: Vec<AttachedDisk>,
    /// Shares QEMU serves itself (virtio-9p).
    pub shares: Vec<Share>,
    /// Shares a virtiofsd serves (virtio-fs); the guest's memory is then shared with it.
    pub virtio_fs: Vec<VirtioFs>,
    pub vsock_cid: Option<u32>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub nics: Vec<Nic>,
    /// Extra kernel command-line words (`NAME=value` reach the guest's init).
    pub cmdline: Vec<String>,
    pub serial: Serial,
    pub accel: Accel,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone)]
pub enum Serial {
    File(PathBuf),
    /// QEMU's own stdout.
    Stdio,
}

impl QemuConfig {
    /// `-m` unless told otherwise.
    pub const DEFAULT_MEMORY_MIB: u32 = 128;

    pub fn new(kernel: PathBuf, initrd: Option<PathBuf>, serial: Serial) -> Self {
        QemuConfig {
            binary: "qemu-system-x86_64".into(),
            kernel,
            initrd,
            root_disk: None,
            disks: Vec::new(),
            shares: Vec::new(),
            virtio_fs: Vec::new(),
            vsock_cid: None,
            memory_mib: Self::DEFAULT_MEMORY_MIB,
            cpus: 1,
            nics: Vec::new(),
            cmdline: Vec::new(),
            serial,
            accel: Accel::detect().0,
        }
    }

    /// The kernel command line: console on the first serial port, quiet, and on any
    /// panic an immediate reset (which `-no-reboot` turns into QEMU exiting).
    pub fn kernel_cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "panic=-1".into(),
            "reboot=t".into(),
        ];
        if self.accel == Accel::Tcg {
            if let Some(khz) = host_tsc_khz() {
                words.push(format!("tsc_early_khz={khz}"));
            }
        }
        if let Some(root) = &self.root_disk {
            words.push("root=/dev/vda".into());
            words.push(if root.read_only { "ro" } else { "rw" }.into());
        }
        words.extend(self.cmdline.iter().cloned());
        words.join(" ")
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
            .map(String::from)
            .to_vec();
        a.extend(self.accel.qemu_args());
        // microvm: no PCI or firmware to probe, the fastest boot under TCG.
        a.extend(["-M".into(), "microvm,x-option-roms=off,acpi=on".into()]);
        a.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
        ]);
        a.extend(["-kernel".into(), self.kernel.display().to_string()]);
        if let Some(initrd) = &self.initrd {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        a.extend(["-append".into(), self.kernel_cmdline()]);
        let serial = match &self.serial {
            Serial::File(p) => format!("file:{}", p.display()),
            Serial::Stdio => "stdio".into(),
        };
        a.extend(["-serial".into(), serial]);
        for (i, nic) in self.nics.iter().enumerate() {
            let id = format!("net{i}");
            if let Some(chardev) = nic.chardev(&id) {
                a.extend(["-chardev".into(), chardev]);
            }
            a.extend(["-netdev".into(), nic.netdev(&id)]);
            a.extend([
                "-device".into(),
                format!("virtio-net-device,netdev={id},mac={}{}", nic.mac, nic.multiqueue()),
            ]);
        }
        for (i, disk) in self.root_disk.iter().chain(&self.disks).enumerate() {
            a.extend(disk.args(&format!("disk{i}")));
        }
        for (i, share) in self.shares.iter().enumerate() {
            a.extend(share_args(share, &format!("share{i}")));
        }
        if !self.virtio_fs.is_empty() || self.nics.iter().any(Nic::is_vhost_user) {
            a.extend(shared_memory_args(self.memory_mib));
        }
        for (i, fs) in self.virtio_fs.iter().enumerate() {
            a.extend([
                "-chardev".into(),
                format!("socket,id=fs{i},path={}", fs.socket.display()),
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs{i},tag={}", fs.tag),
            ]);
        }
        if let Some(cid) = self.vsock_cid {
            a.extend(["-device".into(), format!("vhost-vsock-device,guest-cid={cid}")]);
        }
        a
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(self.args());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_one_netdev_per_nic() {
        let mut q = QemuConfig::new("/k".into(), Some("/i".into()), Serial::File("/log".into()));
        q.accel = Accel::Tcg;
        q.nics.push(Nic {
            backend: NicBackend::Unixgram {
                switch_path: "/s.sock".into(),
                guest_path: "/g.sock".into(),
            },
            mac: Mac([0x02, 0, 0, 0, 0, 1]),
        });
        q.nics.push(Nic {
            backend: NicBackend::Stream { path: "/st".into() },
            mac: Mac([0x02, 0, 0, 0, 0, 2]),
        });
        let args = q.args().join(" ");
        assert!(args
            .contains("-netdev dgram,id=net0,local.type=unix,local.path=/g.sock,remote.type=unix,remote.path=/s.sock"));
        assert!(args.contains("-device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(args.contains("-netdev stream,id=net1,server=off,addr.type=unix,addr.path=/st"));
        assert!(args.contains("-accel tcg"));
        assert!(!args.contains("memory-backend"), "private memory without virtio-fs");
        assert!(!args.contains("vsock"));
        q.vsock_cid = Some(7);
        assert!(q.args().join(" ").contains("-device vhost-vsock-device,guest-cid=7"));
        q.virtio_fs.push(crate::storage::VirtioFs {
            socket: "/run/fs0.sock".into(),
            tag: "src".into(),
        });
        let args = q.args().join(" ");
        assert!(args.contains("-object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem"));
        assert!(
            args.contains("-chardev socket,id=fs0,path=/run/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=src")
        );
        assert!(args.contains("-serial file:/log"));
    }
}
