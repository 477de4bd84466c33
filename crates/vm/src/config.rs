//! What a VM is: its image, size, NICs and console, validated before anything starts.

use std::path::PathBuf;

use crate::cloud_init::CloudInit;
use crate::qemu::Nic;
use crate::storage::{Disk, Share};

/// The smallest memory the test guest boots in: 80 MiB boots, 64 MiB does not (the
/// 14 MB kernel and the initramfs no longer fit).
pub const MIN_MEMORY_MIB: u32 = 80;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// Groups VMs (a tenant, a CI job); names are unique within a namespace.
    pub namespace: String,
    pub kernel: PathBuf,
    /// Without one the kernel mounts the root disk itself.
    pub initramfs: Option<PathBuf>,
    /// The guest's root filesystem (`root=` names it on the kernel command line).
    pub root_disk: Option<Disk>,
    pub data_disks: Vec<Disk>,
    pub shares: Vec<Share>,
    /// The guest's vsock address; unique on the host (the runner allocates it).
    pub vsock_cid: Option<u32>,
    /// A NoCloud seed the runner writes for this boot.
    pub cloud_init: Option<CloudInit>,
    /// systemd's machine id for the guest: 32 lowercase hex digits.
    pub machine_id: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// One NIC per attachment, each a vmfabric port.
    pub attachments: Vec<Nic>,
    pub serial_log: PathBuf,
    /// Extra kernel command-line words (`NAME=value` reach the guest's init).
    pub cmdline: Vec<String>,
    /// Run the VMM inside this network namespace (needed for TAP devices there).
    pub netns: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmConfigError {
    /// The name breaks the naming rules.
    #[error(
        "VM name {0:?} must be 1 to 128 characters of letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    Name(String),
    #[error(
        "namespace {0:?} must be 1 to 128 characters of letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    Namespace(String),
    #[error("a VM needs at least 1 CPU")]
    Cpus,
    #[error("{0} MiB of memory is less than the {MIN_MEMORY_MIB} MiB the guest needs to boot")]
    Memory(u32),
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("network namespace {0:?} does not exist")]
    Netns(String),
    #[error("a VM needs a kernel, and an initramfs or a root disk")]
    NoRoot,
    #[error("shared directory {0} is not a directory")]
    ShareNotDir(PathBuf),
    #[error("share tag {0:?} must be 1 to 31 letters, digits, '.', '_' or '-'")]
    ShareTag(String),
    #[error("share tag {0:?} is used twice")]
    ShareTagTwice(String),
    #[error("vsock CID {0} is reserved: guests take 3 to 4294967294")]
    VsockCid(u32),
    #[error("this host's kernel offers no vhost-vsock (/dev/vhost-vsock is missing)")]
    VsockUnavailable,
    #[error("machine id {0:?} must be 32 lowercase hex digits")]
    MachineId(String),
}

/// Where QEMU attaches a VM's vsock device.
pub const VHOST_VSOCK: &str = "/dev/vhost-vsock";

fn valid_name(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !n.starts_with(['.', '-'])
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), VmConfigError> {
        if !valid_name(&self.name) {
            return Err(VmConfigError::Name(self.name.clone()));
        }
        if !valid_name(&self.namespace) {
            return Err(VmConfigError::Namespace(self.namespace.clone()));
        }
        if self.cpus == 0 {
            return Err(VmConfigError::Cpus);
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(VmConfigError::Memory(self.memory_mib));
        }
        if self.initramfs.is_none() && self.root_disk.is_none() {
            return Err(VmConfigError::NoRoot);
        }
        let files = [("kernel", Some(&self.kernel)), ("initramfs", self.initramfs.as_ref())]
            .into_iter()
            .chain([("root disk", self.root_disk.as_ref().map(|d| &d.path))])
            .chain(self.data_disks.iter().map(|d| ("data disk", Some(&d.path))));
        for (what, path) in files {
            if let Some(p) = path.filter(|p| !p.is_file()) {
                return Err(VmConfigError::Missing { what, path: p.clone() });
            }
        }
        let mut tags = std::collections::HashSet::new();
        for s in &self.shares {
            if !s.host.is_dir() {
                return Err(VmConfigError::ShareNotDir(s.host.clone()));
            }
            if !Share::valid_tag(&s.tag) {
                return Err(VmConfigError::ShareTag(s.tag.clone()));
            }
            if !tags.insert(&s.tag) {
                return Err(VmConfigError::ShareTagTwice(s.tag.clone()));
            }
        }
        if let Some(cid) = self.vsock_cid {
            // 0 is the hypervisor, 1 local, 2 the host, u32::MAX "any".
            if !(3..u32::MAX).contains(&cid) {
                return Err(VmConfigError::VsockCid(cid));
            }
            if !std::path::Path::new(VHOST_VSOCK).exists() {
                return Err(VmConfigError::VsockUnavailable);
            }
        }
        if let Some(id) = &self.machine_id {
            if id.len() != 32 || !id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
                return Err(VmConfigError::MachineId(id.clone()));
            }
        }
        if let Some(ns) = &self.netns {
            if !std::path::Path::new("/var/run/netns").join(ns).exists() {
                return Err(VmConfigError::Netns(ns.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> VmConfig {
        let exe = std::env::current_exe().unwrap();
        VmConfig {
            name: "web-1".into(),
            namespace: "default".into(),
            kernel: exe.clone(),
            initramfs: Some(exe),
            root_disk: None,
            data_disks: vec![],
            shares: vec![],
            vsock_cid: None,
            cloud_init: None,
            machine_id: None,
            cpus: 1,
            memory_mib: 96,
            attachments: vec![],
            serial_log: "/tmp/x.log".into(),
            cmdline: vec![],
            netns: None,
        }
    }

    #[test]
    fn validation_says_what_is_wrong() {
        assert_eq!(ok().validate(), Ok(()));
        let long = "a".repeat(129);
        for bad in ["", ".hidden", "-flag", "a b", "slash/y", long.as_str()] {
            let c = VmConfig {
                name: bad.into(),
                ..ok()
            };
            assert!(matches!(c.validate(), Err(VmConfigError::Name(_))), "{bad:?}");
        }
        assert_eq!(
            VmConfig {
                name: "a".repeat(128),
                ..ok()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(VmConfig { cpus: 0, ..ok() }.validate(), Err(VmConfigError::Cpus));
        assert_eq!(
            VmConfig { memory_mib: 64, ..ok() }.validate(),
            Err(VmConfigError::Memory(64))
        );
        let e = VmConfig {
            kernel: "/nope/vmlinuz".into(),
            ..ok()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "kernel /nope/vmlinuz does not exist");
        assert_eq!(
            VmConfig {
                initramfs: None,
                ..ok()
            }
            .validate(),
            Err(VmConfigError::NoRoot)
        );
        let disk = |p: &str| Disk {
            path: p.into(),
            mode: crate::storage::DiskMode::Overlay,
        };
        let e = VmConfig {
            data_disks: vec![disk("/nope/data.raw")],
            ..ok()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "data disk /nope/data.raw does not exist");
        // A directory is no disk image.
        assert!(matches!(
            VmConfig {
                root_disk: Some(disk("/tmp")),
                ..ok()
            }
            .validate(),
            Err(VmConfigError::Missing { what: "root disk", .. })
        ));
        let share = |host: &str, tag: &str| Share {
            host: host.into(),
            tag: tag.into(),
            read_only: false,
        };
        let with_shares = |shares| VmConfig { shares, ..ok() }.validate();
        assert_eq!(with_shares(vec![share("/tmp", "work")]), Ok(()));
        assert_eq!(
            with_shares(vec![share("/etc/hostname", "x")]),
            Err(VmConfigError::ShareNotDir("/etc/hostname".into()))
        );
        assert_eq!(
            with_shares(vec![share("/tmp", "a,b")]),
            Err(VmConfigError::ShareTag("a,b".into()))
        );
        assert_eq!(
            with_shares(vec![share("/tmp", "w"), share("/var", "w")]),
            Err(VmConfigError::ShareTagTwice("w".into()))
        );
        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(
                VmConfig {
                    vsock_cid: Some(cid),
                    ..ok()
                }
                .validate(),
                Err(VmConfigError::VsockCid(cid))
            );
        }
        for bad in ["", "ABCDEF0123456789ABCDEF0123456789", "0123"] {
            assert_eq!(
                VmConfig {
                    machine_id: Some(bad.into()),
                    ..ok()
                }
                .validate(),
                Err(VmConfigError::MachineId(bad.into()))
            );
        }
        assert!(matches!(
            VmConfig {
                netns: Some("nope-ns".into()),
                ..ok()
            }
            .validate(),
            Err(VmConfigError::Netns(_))
        ));
    }
}
