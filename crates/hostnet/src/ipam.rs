//! Addresses for kernel-mode ports: the lowest free host address of the subnet, never
//! the network, gateway or broadcast address; a reservation wins; addresses reserved
//! for others are skipped. The caller keeps `used` (the store's leases and ports), so
//! an address is free again as soon as its port is deleted.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::HostnetError;

pub struct Pool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Pool {
    fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip) && ip != self.subnet.network() && ip != self.subnet.broadcast() && ip != self.gateway
    }

    /// The address for a port: `reserved` when given (it must be a free host address),
    /// else the lowest host address in neither `used` nor `reserved_for_others`.
    pub fn assign(
        &self,
        used: &HashSet<Ipv4Addr>,
        reserved_for_others: &HashSet<Ipv4Addr>,
        reserved: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, HostnetError> {
        if let Some(ip) = reserved {
            if !self.is_host(ip) || used.contains(&ip) {
                return Err(HostnetError::Invalid(format!(
                    "reserved address {ip} is not a free host address of {}",
                    self.subnet
                )));
            }
            return Ok(ip);
        }
        self.subnet
            .hosts()
            .find(|ip| self.is_host(*ip) && !used.contains(ip) && !reserved_for_others.contains(ip))
            .ok_or_else(|| HostnetError::Invalid(format!("no free address left in {}", self.subnet)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            subnet: "10.60.0.0/29".parse().unwrap(),
            gateway: "10.60.0.1".parse().unwrap(),
        }
    }

    #[test]
    fn lowest_free_skipping_gateway_reserved_and_used() {
        let p = pool();
        let none = HashSet::new();
        assert_eq!(p.assign(&none, &none, None).unwrap(), Ipv4Addr::new(10, 60, 0, 2));
        let used: HashSet<_> = [Ipv4Addr::new(10, 60, 0, 2)].into();
        let others: HashSet<_> = [Ipv4Addr::new(10, 60, 0, 3)].into();
        assert_eq!(p.assign(&used, &others, None).unwrap(), Ipv4Addr::new(10, 60, 0, 4));
        // Released: free again.
        assert_eq!(p.assign(&none, &others, None).unwrap(), Ipv4Addr::new(10, 60, 0, 2));
        // A reservation wins, but must be a free host address.
        assert_eq!(
            p.assign(&none, &none, Some(Ipv4Addr::new(10, 60, 0, 6))).unwrap(),
            Ipv4Addr::new(10, 60, 0, 6)
        );
        for bad in ["10.60.0.0", "10.60.0.1", "10.60.0.7", "10.61.0.2", "10.60.0.2"] {
            assert!(p.assign(&used, &none, Some(bad.parse().unwrap())).is_err(), "{bad}");
        }
        // Exhausted: .2 to .6 taken.
        let all: HashSet<_> = (2..=6).map(|n| Ipv4Addr::new(10, 60, 0, n)).collect();
        assert!(p.assign(&all, &none, None).is_err());
    }
}
