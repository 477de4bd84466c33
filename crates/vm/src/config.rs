//! What a VM is: its image, size, NICs and console, validated before anything starts.

use std::path::PathBuf;

use crate::qemu::Nic;

/// The smallest memory the test guest boots in: 80 MiB boots, 64 MiB does not (the
/// 14 MB kernel and the initramfs no longer fit).
pub const MIN_MEMORY_MIB: u32 = 80;

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// Groups VMs (a tenant, a CI job); names are unique within a namespace.
    pub namespace: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub root_disk: Option<PathBuf>,
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
}

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
        let files = [
            ("kernel", Some(&self.kernel)),
            ("initramfs", Some(&self.initramfs)),
            ("root disk", self.root_disk.as_ref()),
        ];
        for (what, path) in files {
            if let Some(p) = path.filter(|p| !p.exists()) {
                return Err(VmConfigError::Missing { what, path: p.clone() });
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
            initramfs: exe,
            root_disk: None,
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
