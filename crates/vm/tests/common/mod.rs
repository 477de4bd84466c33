//! Shared by the tests that boot real guests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn skip(why: &str) -> Option<PathBuf> {
    assert!(
        std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
        "VM tests are required here but: {why}"
    );
    eprintln!("SKIP: {why}");
    None
}

/// The guest image, built (and cached) on first use; `None` (after saying why) where
/// QEMU or the image cannot be had.
pub fn guest_dir() -> Option<PathBuf> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    }
    let dir = std::env::var_os("VMFABRIC_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace().join("target/guest"));
    let ok = Command::new(workspace().join("guest/build.sh"))
        .arg(&dir)
        .status()
        .map(|s| s.success());
    if !matches!(ok, Ok(true)) {
        return skip("the guest image could not be built (guest/build.sh needs apt-get and dpkg-deb)");
    }
    Some(dir)
}

pub fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Debian disk guest (guest/build-debian.sh), built (and cached) on first use
/// where root can run mmdebstrap; `None` (after saying why) elsewhere.
pub fn debian_guest_dir() -> Option<PathBuf> {
    guest_dir()?;
    if !rustix::process::geteuid().is_root() {
        return skip("the Debian guest is built by mmdebstrap as root");
    }
    let dir = std::env::var_os("VMFABRIC_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or(workspace().join("target/debian-guest"));
    let ok = Command::new(workspace().join("guest/build-debian.sh"))
        .arg(&dir)
        .status()
        .map(|s| s.success());
    if !matches!(ok, Ok(true)) {
        return skip(
            "the Debian guest could not be built (guest/build-debian.sh needs mmdebstrap and Debian's mirror)",
        );
    }
    Some(dir)
}
