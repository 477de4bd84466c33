//! Creating the fds ports are served through: socketpairs, bound datagram paths,
//! listening stream paths and TAP devices. All are non-blocking and close-on-exec on
//! the switch's side, with socket buffers sized for bursts.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::error::{FabricError, Result};

/// Asks for `bytes` of send and receive buffer. Linux caps the request at
/// `net.core.wmem_max`/`rmem_max` (4 MiB here) without an error; that is fine, the cap
/// is what the administrator allows.
pub(crate) fn size_buffers(fd: &impl AsFd, bytes: usize) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(fd, bytes);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(fd, bytes);
}

/// A SOCK_DGRAM socketpair: (switch end, non-blocking; VM end, blocking as a VMM
/// expects). Both close-on-exec: whoever hands the VM end to a child process clears
/// that flag on purpose.
pub(crate) fn socketpair(buffer: usize) -> Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| FabricError::io("create socketpair", e.into()))?;
    rustix::io::ioctl_fionbio(&ours, true).map_err(|e| FabricError::io("make socket non-blocking", e.into()))?;
    size_buffers(&ours, buffer);
    size_buffers(&theirs, buffer);
    Ok((ours, theirs))
}

/// Removes `path` if it is a socket nobody listens on any more (left by a crash);
/// refuses when a live socket or a non-socket file is there.
fn clear_stale_socket(path: &Path, kind: SocketType) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FabricError::io(format!("inspect {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(FabricError::InvalidConfig(format!(
            "{} exists and is not a socket",
            path.display()
        )));
    }
    let probe = rustix::net::socket_with(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None)
        .map_err(|e| FabricError::io("create probe socket", e.into()))?;
    let addr =
        SocketAddrUnix::new(path).map_err(|e| FabricError::io(format!("socket path {}", path.display()), e.into()))?;
    match rustix::net::connect(&probe, &addr) {
        Ok(()) => Err(FabricError::PathInUse(path.display().to_string())),
        Err(rustix::io::Errno::CONNREFUSED) => {
            fs::remove_file(path).map_err(|e| FabricError::io(format!("remove stale socket {}", path.display()), e))
        }
        Err(e) => Err(FabricError::io(format!("probe {}", path.display()), e.into())),
    }
}

/// Makes `path` ready to bind a listening stream socket another library creates: its
/// directory made, a stale socket removed, a live one or another file refused.
pub(crate) fn prepare_socket_path(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| FabricError::io(format!("create {}", dir.display()), e))?;
    }
    clear_stale_socket(path, SocketType::STREAM)
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| FabricError::io(format!("chmod {}", path.display()), e))
}

/// Binds a socket of `kind` at `path` with the given file mode.
fn bind_path(path: &Path, kind: SocketType, mode: u32, buffer: usize) -> Result<OwnedFd> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| FabricError::io(format!("create {}", dir.display()), e))?;
    }
    clear_stale_socket(path, kind)?;
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        kind,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| FabricError::io("create socket", e.into()))?;
    let addr =
        SocketAddrUnix::new(path).map_err(|e| FabricError::io(format!("socket path {}", path.display()), e.into()))?;
    rustix::net::bind(&sock, &addr).map_err(|e| FabricError::io(format!("bind {}", path.display()), e.into()))?;
    set_mode(path, mode)?;
    size_buffers(&sock, buffer);
    Ok(sock)
}

pub(crate) fn bind_unixgram(path: &Path, mode: u32, buffer: usize) -> Result<OwnedFd> {
    bind_path(path, SocketType::DGRAM, mode, buffer)
}

pub(crate) fn listen_stream(path: &Path, mode: u32, buffer: usize) -> Result<OwnedFd> {
    let sock = bind_path(path, SocketType::STREAM, mode, buffer)?;
    rustix::net::listen(&sock, 16).map_err(|e| FabricError::io(format!("listen on {}", path.display()), e.into()))?;
    Ok(sock)
}
