//! Ethernet MAC addresses.
//!
//! A `Mac` is six bytes with the two flag bits of the first octet given names: the
//! I/G bit (group: broadcast and multicast) and the U/L bit (locally administered).

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    pub const ZERO: Mac = Mac([0; 6]);

    /// Reads the first six bytes of `bytes`; `None` when there are fewer.
    pub fn from_slice(bytes: &[u8]) -> Option<Mac> {
        let six: [u8; 6] = bytes.get(..6)?.try_into().ok()?;
        Some(Mac(six))
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Group address (I/G bit set): broadcast or multicast. Such a destination floods;
    /// such a source is never genuine.
    pub fn is_group(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Mac::BROADCAST
    }

    pub fn is_unicast(&self) -> bool {
        !self.is_group()
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A stable, locally administered unicast MAC for `parts` (e.g. network and port
    /// name): the first six bytes of SHA-256 over the parts, each length-prefixed, with
    /// the U/L bit set and the I/G bit cleared. SHA-256 and not `DefaultHasher`, whose
    /// output may change between Rust releases; this derivation is part of our
    /// interface and must not change (version 1).
    pub fn derived(parts: &[&str]) -> Mac {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"vmfabric-mac-v1");
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        let d = h.finalize();
        let mut m = [0u8; 6];
        m.copy_from_slice(&d[..6]);
        m[0] = (m[0] | 0x02) & !0x01;
        Mac(m)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not six colon- or dash-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56")]
pub struct ParseMacError(pub String);

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("02-00-00-00-00-01".parse::<Mac>().unwrap().0[5], 1);
        assert_eq!(Mac::ZERO.to_string(), "00:00:00:00:00:00");
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52:54:00:ab:cd:zz",
            "525:4:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn from_slice_needs_six_bytes() {
        assert_eq!(Mac::from_slice(&[1, 2, 3, 4, 5]), None);
        assert_eq!(Mac::from_slice(&[]), None);
        assert_eq!(Mac::from_slice(&[1, 2, 3, 4, 5, 6, 7]), Some(Mac([1, 2, 3, 4, 5, 6])));
    }

    #[test]
    fn derived_macs_are_stable_local_unicast() {
        let a = Mac::derived(&["default", "vm0"]);
        assert_eq!(a, Mac::derived(&["default", "vm0"]));
        assert!(a.is_unicast() && a.is_locally_administered());
        assert_ne!(a, Mac::derived(&["default", "vm1"]));
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        assert_ne!(Mac::derived(&["ab", "c"]), Mac::derived(&["a", "bc"]));
        // Pinned: a change here breaks every user's stored MACs.
        assert_eq!(a.to_string(), "4a:0d:48:d3:e3:2b");
    }

    #[test]
    fn flag_bits() {
        assert!(Mac::BROADCAST.is_group() && Mac::BROADCAST.is_broadcast());
        let mcast = Mac([0x01, 0x00, 0x5e, 0, 0, 1]);
        assert!(mcast.is_group() && !mcast.is_broadcast());
        let laa = Mac([0x02, 0, 0, 0, 0, 1]);
        assert!(laa.is_unicast() && laa.is_locally_administered());
        assert!(!Mac([0x00, 0x16, 0x3e, 0, 0, 1]).is_locally_administered());
    }
}
