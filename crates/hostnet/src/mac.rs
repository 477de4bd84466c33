//! Stable MACs for kernel-mode ports: derived from the network and port names with
//! SHA-256 (`fabric::Mac::derived`: the same on every machine and Rust release),
//! locally administered unicast, and unique within a network.

use std::collections::HashSet;

use fabric::Mac;

/// The MAC for `port` on `network`, skipping any in `taken` (the next candidate adds
/// a counter to the hash input, so the choice stays deterministic).
pub fn stable_mac(network: &str, port: &str, taken: &HashSet<Mac>) -> Mac {
    let first = Mac::derived(&[network, port]);
    if !taken.contains(&first) {
        return first;
    }
    (1u32..)
        .map(|n| Mac::derived(&[network, port, &n.to_string()]))
        .find(|m| !taken.contains(m))
        .expect("an unused MAC among 2^32 candidates")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_unicast_local_and_unique() {
        let none = HashSet::new();
        let a = stable_mac("ci", "runner1", &none);
        assert_eq!(a, stable_mac("ci", "runner1", &none), "same input, same MAC");
        assert!(a.is_unicast() && a.is_locally_administered());
        assert_ne!(a, stable_mac("ci", "runner2", &none));
        let taken: HashSet<Mac> = [a].into();
        let b = stable_mac("ci", "runner1", &taken);
        assert_ne!(a, b, "a collision takes the next candidate");
        assert!(b.is_unicast() && b.is_locally_administered());
    }
}
