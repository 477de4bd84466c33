//! Leases and the storage interface the control plane implements to make them durable.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use fabric::Mac;

/// A bound DHCP lease. Times are seconds since the Unix epoch, so a stored lease means
/// the same after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// The VM's DNS name: its DHCP hostname, or its port's label.
    pub hostname: Option<String>,
    pub expires: u64,
}

/// A DHCPv6 binding: the address a MAC holds, for the client that asked (its DUID and
/// the identity association's id), until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease6 {
    pub mac: Mac,
    pub ip: std::net::Ipv6Addr,
    pub duid: Vec<u8>,
    pub iaid: u32,
    pub expires: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("lease store: {0}")]
pub struct StoreError(pub String);

/// What a claim on an address shared with other hosts came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The address is the MAC's (now, or already) until the claim's expiry.
    Granted,
    /// Another host gave it to another MAC.
    Taken,
    /// The shared store cannot be asked now: nothing is handed out on a guess.
    Unavailable,
}

/// Where leases are kept. Every change is written before the client hears about it,
/// so an acknowledged lease survives a crash once the store is durable.
pub trait LeaseStore: Send {
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    fn save(&mut self, lease: &Lease) -> Result<(), StoreError>;
    fn remove(&mut self, mac: Mac) -> Result<(), StoreError>;
    /// The same for DHCPv6 bindings (one per MAC, apart from its IPv4 lease).
    fn load6(&self) -> Result<Vec<Lease6>, StoreError>;
    fn save6(&mut self, lease: &Lease6) -> Result<(), StoreError>;
    fn remove6(&mut self, mac: Mac) -> Result<(), StoreError>;
    /// Claims `ip` for `mac` until `expires` where other hosts hand out addresses of
    /// the same network (a cluster), before the address is offered or bound anew.
    /// One host's store has no one else to ask.
    fn claim(&mut self, _ip: Ipv4Addr, _mac: Mac, _expires: u64) -> Claimed {
        Claimed::Granted
    }
}

/// Leases in memory. Clones share one table, so a test (or a restarted gateway in the
/// same process) sees what another wrote.
#[derive(Debug, Clone, Default)]
pub struct MemoryLeaseStore {
    leases: Arc<Mutex<HashMap<Mac, Lease>>>,
    leases6: Arc<Mutex<HashMap<Mac, Lease6>>>,
}

impl MemoryLeaseStore {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table6(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, Lease6>> {
        self.leases6.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.table().values().cloned().collect())
    }

    fn save(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.table().insert(lease.mac, lease.clone());
        Ok(())
    }

    fn remove(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.table().remove(&mac);
        Ok(())
    }

    fn load6(&self) -> Result<Vec<Lease6>, StoreError> {
        Ok(self.table6().values().cloned().collect())
    }

    fn save6(&mut self, lease: &Lease6) -> Result<(), StoreError> {
        self.table6().insert(lease.mac, lease.clone());
        Ok(())
    }

    fn remove6(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.table6().remove(&mac);
        Ok(())
    }
}
