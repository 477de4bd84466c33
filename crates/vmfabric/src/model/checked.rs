//! Values checked once, when they are read: names, MTUs, interface names and the
//! socket paths built from names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Input the API refuses, with what is wrong with it (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(msg: impl Into<String>) -> Invalid {
        Invalid(msg.into())
    }
}

/// A network, port or VM name: 1 to [`Name::MAX`] letters, digits, '.', '_' or '-',
/// not starting with '.' or '-' (it becomes part of file and device names).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
pub struct Name(String);

impl Name {
    pub const MAX: usize = 64;

    pub fn new(what: &str, text: &str) -> Result<Name, Invalid> {
        let ok = (1..=Name::MAX).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !text.starts_with(['.', '-']);
        if ok {
            Ok(Name(text.to_string()))
        } else {
            Err(Invalid(format!(
                "{what} name {text:?} must be 1 to {} characters of letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                Name::MAX
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Name, Invalid> {
        Name::new("the", &s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an interface name the kernel will be given: 1 to 15 bytes, none of '/',
/// ':', '%' or whitespace (the kernel would refuse them, or with '%' pick a name of its
/// own: `cp%d` becomes `cp0`, and the stored name would not be the device's).
pub fn check_ifname(what: &str, name: &str) -> Result<(), Invalid> {
    fabric::check_ifname(name).map_err(|e| Invalid(format!("{what}: {e}")))
}

/// The longest Unix socket path a `sockaddr_un` holds (108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The sockets the daemon binds (or tells a VMM to bind) under its run dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPlace {
    /// A unixgram port's own end: `ports/NETWORK/PORT.sock`.
    PortDatagram,
    /// A stream port's listener: `ports/NETWORK/PORT.stream`.
    PortStream,
    /// Where a unixgram port's VMM binds: `guests/NETWORK-PORT.sock`.
    Guest,
    /// A VM's NIC (the runner's QEMU binds it): `vms/VM.nic.sock`.
    VmNic,
    /// A vhost-user port's listener: `ports/NETWORK/PORT.vhost`.
    PortVhostUser,
}

impl SocketPlace {
    pub const ALL: [SocketPlace; 5] = [
        SocketPlace::PortDatagram,
        SocketPlace::PortStream,
        SocketPlace::Guest,
        SocketPlace::VmNic,
        SocketPlace::PortVhostUser,
    ];

    pub fn subdir(self) -> &'static str {
        match self {
            SocketPlace::PortDatagram | SocketPlace::PortStream | SocketPlace::PortVhostUser => "ports",
            SocketPlace::Guest => "guests",
            SocketPlace::VmNic => "vms",
        }
    }

    fn ext(self) -> &'static str {
        match self {
            SocketPlace::PortDatagram | SocketPlace::Guest => "sock",
            SocketPlace::PortStream => "stream",
            SocketPlace::VmNic => "nic.sock",
            SocketPlace::PortVhostUser => "vhost",
        }
    }

    /// The path's readable form, from the names it is for.
    fn readable(self, names: &[&str]) -> String {
        match self {
            SocketPlace::PortDatagram | SocketPlace::PortStream | SocketPlace::PortVhostUser => names.join("/"),
            SocketPlace::Guest | SocketPlace::VmNic => names.join("-"),
        }
    }
}

/// Hex digits of the digest that stands for names too long to spell out.
const DIGEST_HEX: usize = 16;

/// The longest path a socket can have under a run dir of `run_dir_len` bytes: the
/// longest subdir, then a digest name with the longest extension.
const fn longest_fallback(run_dir_len: usize) -> usize {
    // "/guests/" + "~" + digest + "." + "nic.sock"
    run_dir_len + "/guests/".len() + 1 + DIGEST_HEX + 1 + "nic.sock".len()
}

/// The longest run dir under which every socket path fits `sun_path`, whatever the
/// names (checked once at start, [`check_run_dir`]).
pub const MAX_RUN_DIR: usize = MAX_SOCKET_PATH - longest_fallback(0);

/// The socket path for `names` at `place` under `run_dir`: spelled out when it fits
/// `sun_path`, else a digest of the names (`~` and 16 hex digits), which fits for any
/// names because the run dir is at most [`MAX_RUN_DIR`] bytes. Deterministic: the same
/// names give the same path after a restart.
pub fn socket_path(run_dir: &std::path::Path, place: SocketPlace, names: &[&str]) -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let dir = run_dir.join(place.subdir());
    let readable = place.readable(names);
    let spelled = dir.join(format!("{readable}.{}", place.ext()));
    if spelled.as_os_str().len() <= MAX_SOCKET_PATH {
        return spelled;
    }
    let digest = Sha256::digest(readable.as_bytes());
    let hex: String = digest.iter().take(DIGEST_HEX / 2).map(|b| format!("{b:02x}")).collect();
    dir.join(format!("~{hex}.{}", place.ext()))
}

/// Refuses a run dir so long that a socket path under it might not fit `sun_path`.
pub fn check_run_dir(run_dir: &std::path::Path) -> Result<(), Invalid> {
    let len = run_dir.as_os_str().len();
    if len <= MAX_RUN_DIR {
        Ok(())
    } else {
        Err(Invalid(format!(
            "the run dir {} is {len} bytes; the sockets under it need it at most {MAX_RUN_DIR} (a Unix socket path \
             holds {MAX_SOCKET_PATH}): pick a shorter --run-dir",
            run_dir.display()
        )))
    }
}

/// A link MTU: 68 (IPv4's minimum) to 65520 (what a TAP device and the switch's
/// buffers take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Mtu(u16);

impl utoipa::PartialSchema for Mtu {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .minimum(Some(Mtu::MIN))
            .maximum(Some(Mtu::MAX))
            .default(Some(1500.into()))
            .into()
    }
}

impl utoipa::ToSchema for Mtu {}

impl Mtu {
    pub const MIN: u32 = fabric::config::MIN_MTU as u32;
    pub const MAX: u32 = fabric::config::MAX_MTU as u32;
    pub const ETHERNET: Mtu = Mtu(1500);

    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for Mtu {
    fn default() -> Mtu {
        Mtu::ETHERNET
    }
}

impl TryFrom<u32> for Mtu {
    type Error = Invalid;
    fn try_from(v: u32) -> Result<Mtu, Invalid> {
        if (Mtu::MIN..=Mtu::MAX).contains(&v) {
            Ok(Mtu(v as u16))
        } else {
            Err(Invalid(format!("mtu {v} is outside {}..={}", Mtu::MIN, Mtu::MAX)))
        }
    }
}

impl From<Mtu> for u32 {
    fn from(m: Mtu) -> u32 {
        m.0.into()
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod socket_path_tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn any_names_fit_under_the_longest_run_dir_and_short_ones_stay_readable() {
        let run_dir = format!("/{}", "r".repeat(MAX_RUN_DIR - 1));
        let run_dir = Path::new(&run_dir);
        check_run_dir(run_dir).unwrap();
        let long = "n".repeat(Name::MAX);
        let other = "m".repeat(Name::MAX);
        for place in SocketPlace::ALL {
            let p = socket_path(run_dir, place, &[&long, &long]);
            assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{place:?}: {}", p.display());
            assert_eq!(
                p,
                socket_path(run_dir, place, &[&long, &long]),
                "the same after a restart"
            );
            assert_ne!(p, socket_path(run_dir, place, &[&long, &other]), "names do not collide");
        }
        let run = Path::new("/run/vmfabric");
        let readable = [
            (
                SocketPlace::PortDatagram,
                &["blue", "vm1"][..],
                "/run/vmfabric/ports/blue/vm1.sock",
            ),
            (
                SocketPlace::PortStream,
                &["blue", "vm1"],
                "/run/vmfabric/ports/blue/vm1.stream",
            ),
            (
                SocketPlace::Guest,
                &["blue", "vm1"],
                "/run/vmfabric/guests/blue-vm1.sock",
            ),
            (SocketPlace::VmNic, &["vm1"], "/run/vmfabric/vms/vm1.nic.sock"),
        ];
        for (place, names, want) in readable {
            assert_eq!(socket_path(run, place, names), Path::new(want));
        }
        let too_long = format!("{}x", run_dir.display());
        assert!(check_run_dir(Path::new(&too_long)).is_err());
    }
}
