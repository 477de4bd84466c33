//! Finding the guest's readiness marker on its serial console.
//!
//! The guest prints `VMFABRIC_READY <nonce> <ip> <mac>` on a line of its own once its
//! NIC has an address. The nonce is fresh for every boot and travels on the kernel
//! command line, so a line from an earlier boot, a copied log, or a guest process
//! echoing an old marker is not believed; the IP must parse and, when vmfabric leased
//! one to the VM, be that one. The log is read incrementally: each scan reads only
//! what was appended since the last one, and a line cut between two reads is kept
//! until its end arrives.

use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::PathBuf;

const MARKER: &str = "VMFABRIC_READY";
/// A line longer than this is not a marker; keeping more of it would let a guest make
/// the host buffer without bound.
const MAX_LINE: usize = 4096;

/// A fresh per-boot token: 128 random bits in hex.
pub fn new_nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub struct ReadinessScanner {
    path: PathBuf,
    nonce: String,
    offset: u64,
    partial: Vec<u8>,
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    NotYet,
    Ready(Ipv4Addr),
    /// The right nonce with an address other than the lease: believed by nobody.
    WrongAddress {
        claimed: Ipv4Addr,
        leased: Ipv4Addr,
    },
}

impl ReadinessScanner {
    pub fn new(path: PathBuf, nonce: String) -> Self {
        ReadinessScanner {
            path,
            nonce,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Reads what the console wrote since the last call. `leased`, when known, is the
    /// address the marker must carry.
    pub fn scan(&mut self, leased: Option<Ipv4Addr>) -> std::io::Result<Readiness> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Readiness::NotYet),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        f.read_to_end(&mut fresh)?;
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let mut found = Readiness::NotYet;
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if found == Readiness::NotYet {
                found = self.check(&String::from_utf8_lossy(&line), leased);
            }
        }
        if self.partial.len() > MAX_LINE {
            self.partial.clear();
        }
        Ok(found)
    }

    fn check(&self, line: &str, leased: Option<Ipv4Addr>) -> Readiness {
        let mut words = line.trim_end_matches(['\r', '\n']).split(' ');
        if words.next() != Some(MARKER) || words.next() != Some(self.nonce.as_str()) {
            return Readiness::NotYet;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) else {
            return Readiness::NotYet;
        };
        match leased {
            Some(l) if l != ip => Readiness::WrongAddress { claimed: ip, leased: l },
            _ => Readiness::Ready(ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scanner(name: &str) -> (ReadinessScanner, std::fs::File) {
        let path = std::env::temp_dir().join(format!("ready-{}-{name}.log", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        (ReadinessScanner::new(path, "abc123".into()), f)
    }

    #[test]
    fn finds_the_marker_with_its_nonce_across_reads() {
        let (mut s, mut f) = scanner("split");
        write!(f, "[    0.1] booting\nVMFABRIC_RE").unwrap();
        assert_eq!(s.scan(None).unwrap(), Readiness::NotYet);
        write!(f, "ADY abc123 10.77.0.5 02:00:00:00:00:01\r\n").unwrap();
        assert_eq!(s.scan(None).unwrap(), Readiness::Ready("10.77.0.5".parse().unwrap()));
    }

    #[test]
    fn forgeries_are_not_believed() {
        let (mut s, mut f) = scanner("forged");
        writeln!(f, "VMFABRIC_READY oldnonce 10.77.0.5 02:00:00:00:00:01").unwrap(); // earlier boot
        writeln!(f, "VMFABRIC_READY abc123 foo 02:00:00:00:00:01").unwrap(); // not an address
        writeln!(f, "echo VMFABRIC_READY abc123 10.77.0.5").unwrap(); // not at line start
        writeln!(f, "VMFABRIC_READY abc1234 10.77.0.5").unwrap(); // nonce prefix
        assert_eq!(s.scan(None).unwrap(), Readiness::NotYet);
        writeln!(f, "VMFABRIC_READY abc123 10.77.0.9 02:00:00:00:00:01").unwrap();
        let leased = Some("10.77.0.5".parse().unwrap());
        assert_eq!(
            s.scan(leased).unwrap(),
            Readiness::WrongAddress {
                claimed: "10.77.0.9".parse().unwrap(),
                leased: "10.77.0.5".parse().unwrap()
            }
        );
    }

    #[test]
    fn endless_lines_are_not_buffered() {
        let (mut s, mut f) = scanner("long");
        f.write_all(&vec![b'x'; 10_000]).unwrap();
        s.scan(None).unwrap();
        assert!(s.partial.len() <= MAX_LINE);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(new_nonce(), new_nonce());
        assert_eq!(new_nonce().len(), 32);
    }
}
