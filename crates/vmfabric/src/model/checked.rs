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

/// Checks that a socket path built from names fits `sun_path`.
pub fn check_socket_path(path: &std::path::Path) -> Result<(), Invalid> {
    let len = path.as_os_str().len();
    if len <= MAX_SOCKET_PATH {
        Ok(())
    } else {
        Err(Invalid(format!(
            "the socket path {} would be {len} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket path holds: \
             use shorter network or port names (or a shorter --run-dir)",
            path.display()
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
