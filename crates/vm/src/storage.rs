//! A VM's disks and the host directories it shares: what they are, how QEMU attaches
//! them, and the per-VM copy-on-write overlay that lets one base image serve many VMs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// How an image's bytes are laid out, as QEMU's `format=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// Reads the image's first bytes: qcow2 starts with its magic `QFI\xfb`; anything
    /// else is raw. Told explicitly rather than left to QEMU's probing, which refuses to
    /// write block 0 of a raw image it had to guess.
    pub fn detect(path: &Path) -> std::io::Result<DiskFormat> {
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path)?;
        let n = f.read(&mut magic)?;
        Ok(if n == 4 && magic == *b"QFI\xfb" {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// What the guest may do to a disk's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// The guest writes the image itself.
    #[default]
    Rw,
    /// The guest sees the image and cannot write it.
    Ro,
    /// The guest writes a fresh qcow2 overlay of its own; the image is never written.
    Overlay,
}

impl std::str::FromStr for DiskMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rw" => Ok(DiskMode::Rw),
            "ro" => Ok(DiskMode::Ro),
            "overlay" => Ok(DiskMode::Overlay),
            other => Err(format!("disk mode {other:?} is none of rw, ro, overlay")),
        }
    }
}

/// A disk image attached as a virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Disk {
    #[cfg_attr(feature = "schema", schema(value_type = String))]
    pub path: PathBuf,
    #[serde(default)]
    pub mode: DiskMode,
}

impl Disk {
    /// `PATH[:rw|:ro|:overlay]`, the CLI's form; `default` when no mode is given.
    pub fn parse(text: &str, default: DiskMode) -> Result<Disk, String> {
        let (path, mode) = match text.rsplit_once(':') {
            Some((p, m)) if ["rw", "ro", "overlay"].contains(&m) => (p, m.parse()?),
            _ => (text, default),
        };
        if path.is_empty() {
            return Err(format!("disk {text:?} names no file"));
        }
        Ok(Disk {
            path: path.into(),
            mode,
        })
    }
}

/// A host directory the guest mounts by its tag (virtio-9p:
/// `mount -t 9p -o trans=virtio TAG /mnt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Share {
    #[cfg_attr(feature = "schema", schema(value_type = String))]
    pub host: PathBuf,
    pub tag: String,
    #[serde(default)]
    pub read_only: bool,
}

impl Share {
    /// `HOST:TAG[:ro]`, the CLI's form.
    pub fn parse(text: &str) -> Result<Share, String> {
        let (rest, read_only) = match text.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (text, false),
        };
        let Some((host, tag)) = rest.rsplit_once(':') else {
            return Err(format!("share {text:?} is not HOST:TAG[:ro]"));
        };
        if host.is_empty() {
            return Err(format!("share {text:?} names no host directory"));
        }
        Ok(Share {
            host: host.into(),
            tag: tag.into(),
            read_only,
        })
    }

    /// Tags are what the guest names on `mount`; QEMU and Linux agree on short, plain ones.
    pub fn valid_tag(tag: &str) -> bool {
        (1..=31).contains(&tag.len())
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    }
}

/// A disk as QEMU opens it this boot: the file and format after any overlay was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDisk {
    pub file: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

impl AttachedDisk {
    /// The `-drive`/`-device` pair for a microvm guest (virtio over MMIO).
    pub fn args(&self, id: &str) -> [String; 4] {
        let ro = if self.read_only { ",readonly=on" } else { "" };
        [
            "-drive".into(),
            format!(
                "file={},if=none,id={id},format={}{ro}",
                self.file.display(),
                self.format.name()
            ),
            "-device".into(),
            format!("virtio-blk-device,drive={id}"),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("qemu-img could not make an overlay of {base}: {why}")]
    Overlay { base: PathBuf, why: String },
}

/// Makes `disk` ready for this boot: for an overlay, a new qcow2 file at `overlay`
/// backed by the image (made by `qemu-img`, the tool that owns the qcow2 format), which
/// replaces any overlay an earlier boot left there.
pub fn attach(disk: &Disk, overlay: &Path) -> Result<AttachedDisk, StorageError> {
    let format = DiskFormat::detect(&disk.path).map_err(|source| StorageError::Read {
        path: disk.path.clone(),
        source,
    })?;
    match disk.mode {
        DiskMode::Rw | DiskMode::Ro => Ok(AttachedDisk {
            file: disk.path.clone(),
            format,
            read_only: disk.mode == DiskMode::Ro,
        }),
        DiskMode::Overlay => {
            let base = std::fs::canonicalize(&disk.path).map_err(|source| StorageError::Read {
                path: disk.path.clone(),
                source,
            })?;
            let _ = std::fs::remove_file(overlay);
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", format.name(), "-b"])
                .arg(&base)
                .arg(overlay)
                .output()
                .map_err(|e| StorageError::Overlay {
                    base: base.clone(),
                    why: e.to_string(),
                })?;
            if !out.status.success() {
                return Err(StorageError::Overlay {
                    base,
                    why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            Ok(AttachedDisk {
                file: overlay.to_path_buf(),
                format: DiskFormat::Qcow2,
                read_only: false,
            })
        }
    }
}

/// The host's virtiofsd, when it has one: `VMFABRIC_VIRTIOFSD`, else `virtiofsd` on the
/// PATH, else where QEMU's packages put it. Shares go over virtio-fs through it (faster
/// and closer to a local file system than 9p), else over virtio-9p, which QEMU serves
/// itself.
pub fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMFABRIC_VIRTIOFSD") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/libexec/virtiofsd".into(), "/usr/lib/qemu/virtiofsd".into()])
        .find(|p| p.is_file())
}

/// A share served by a virtiofsd process: its socket and the tag the guest mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioFs {
    pub socket: PathBuf,
    pub tag: String,
}

/// The virtiofsd command that serves `share` on `socket`; it ends when its VMM
/// disconnects.
pub fn virtiofsd_command(binary: &Path, share: &Share, socket: &Path) -> Command {
    let mut c = Command::new(binary);
    c.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(&share.host)
        .args(["--cache", "auto"]);
    if share.read_only {
        c.arg("--readonly");
    }
    c
}

/// The `-fsdev`/`-device` pair that shares a host directory over virtio-9p.
/// `security_model=none`: files keep the host's owners and the guest's chown/chmod
/// failures are ignored, which is what a shared work directory wants.
pub fn share_args(share: &Share, id: &str) -> [String; 4] {
    let ro = if share.read_only { ",readonly=on" } else { "" };
    [
        "-fsdev".into(),
        format!("local,id={id},path={},security_model=none{ro}", share.host.display()),
        "-device".into(),
        format!("virtio-9p-device,fsdev={id},mount_tag={}", share.tag),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_and_shares_parse_from_the_cli_form() {
        assert_eq!(
            Disk::parse("/img/base.qcow2", DiskMode::Overlay).unwrap(),
            Disk {
                path: "/img/base.qcow2".into(),
                mode: DiskMode::Overlay
            }
        );
        assert_eq!(Disk::parse("/d.raw:ro", DiskMode::Rw).unwrap().mode, DiskMode::Ro);
        // A colon that is not a mode is part of the path.
        assert_eq!(
            Disk::parse("/odd:name", DiskMode::Rw).unwrap().path,
            PathBuf::from("/odd:name")
        );
        assert!(Disk::parse(":ro", DiskMode::Rw).is_err());
        assert_eq!(
            Share::parse("/srv/data:data:ro").unwrap(),
            Share {
                host: "/srv/data".into(),
                tag: "data".into(),
                read_only: true
            }
        );
        assert!(!Share::parse("/srv/x:work").unwrap().read_only);
        assert!(Share::parse("/srv/x").is_err());
        assert!(Share::valid_tag("work_1") && !Share::valid_tag("a b") && !Share::valid_tag(""));
    }

    #[test]
    fn formats_are_read_from_the_image_and_an_overlay_leaves_its_base_alone() {
        let dir = std::env::temp_dir().join(format!("vmf-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("base.raw");
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        assert_eq!(DiskFormat::detect(&raw).unwrap(), DiskFormat::Raw);
        let ro = attach(
            &Disk {
                path: raw.clone(),
                mode: DiskMode::Ro,
            },
            &dir.join("x"),
        )
        .unwrap();
        assert!(ro.read_only && ro.file == raw);
        assert_eq!(
            ro.args("d0")[1],
            format!("file={},if=none,id=d0,format=raw,readonly=on", raw.display())
        );
        if Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("SKIP the overlay half: qemu-img is not installed (scripts/setup.sh installs it)");
            return;
        }
        let overlay = dir.join("vm.overlay.qcow2");
        let a = attach(
            &Disk {
                path: raw.clone(),
                mode: DiskMode::Overlay,
            },
            &overlay,
        )
        .unwrap();
        assert_eq!((a.file.as_path(), a.format), (overlay.as_path(), DiskFormat::Qcow2));
        assert_eq!(DiskFormat::detect(&overlay).unwrap(), DiskFormat::Qcow2);
        // Made again, it is made anew (a second boot starts from the base).
        attach(
            &Disk {
                path: raw.clone(),
                mode: DiskMode::Overlay,
            },
            &overlay,
        )
        .unwrap();
        let e = attach(
            &Disk {
                path: dir.join("missing.raw"),
                mode: DiskMode::Overlay,
            },
            &overlay,
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing.raw"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_read_only_share_is_read_only_to_qemu() {
        let s = Share::parse("/srv/data:data:ro").unwrap();
        assert_eq!(
            share_args(&s, "fs0"),
            [
                "-fsdev".to_string(),
                "local,id=fs0,path=/srv/data,security_model=none,readonly=on".into(),
                "-device".into(),
                "virtio-9p-device,fsdev=fs0,mount_tag=data".into(),
            ]
        );
    }
}
