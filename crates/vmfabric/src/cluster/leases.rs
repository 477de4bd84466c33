//! A cluster network's lease store: this node's leases in SQLite, as on one host, and
//! each address claimed in etcd before it is offered or bound anew. The gateway calls
//! it from its own (confined) thread and never touches etcd itself: a claim is handed
//! to the daemon's runtime and waited for, briefly. Renewals and releases are written
//! back to etcd later, so they never wait for it (and survive its outage).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use fabric::Mac;
use gateway::{Claimed, Lease, Lease6, LeaseStore, StoreError};

use super::node::{ClusterLink, WriteBack};
use super::Claim;
use crate::store::SqliteLeaseStore;

/// How long a DHCP exchange waits for etcd before the guest is left to ask again.
const CLAIM_WAIT: Duration = Duration::from_secs(2);

pub struct ClusterLeases {
    link: Arc<ClusterLink>,
    network: String,
    local: SqliteLeaseStore,
    /// Each bound MAC's address, so a release knows what to give up in etcd without
    /// reading every lease back.
    bound: HashMap<Mac, Ipv4Addr>,
}

impl ClusterLeases {
    pub fn new(link: Arc<ClusterLink>, network: &str, local: SqliteLeaseStore) -> ClusterLeases {
        // A store that cannot be read leaves the map empty: a release it misses is
        // not written back, and the holder in etcd lapses at its lease's end instead.
        let bound = local
            .load()
            .unwrap_or_default()
            .into_iter()
            .map(|l| (l.mac, l.ip))
            .collect();
        ClusterLeases {
            link,
            network: network.to_string(),
            local,
            bound,
        }
    }
}

impl LeaseStore for ClusterLeases {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        self.local.load()
    }

    fn save(&mut self, lease: &Lease) -> Result<(), StoreError> {
        self.local.save(lease)?;
        self.bound.insert(lease.mac, lease.ip);
        self.link
            .write_back(&self.network, lease.ip, WriteBack::Hold(lease.clone()));
        Ok(())
    }

    fn remove(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.local.remove(mac)?;
        let ip = self.bound.remove(&mac);
        if let Some(ip) = ip {
            self.link.write_back(&self.network, ip, WriteBack::Release(mac));
        }
        Ok(())
    }

    fn load6(&self) -> Result<Vec<Lease6>, StoreError> {
        self.local.load6()
    }

    fn save6(&mut self, lease: &Lease6) -> Result<(), StoreError> {
        self.local.save6(lease)
    }

    fn remove6(&mut self, mac: Mac) -> Result<(), StoreError> {
        self.local.remove6(mac)
    }

    fn claim(&mut self, ip: Ipv4Addr, mac: Mac, expires: u64) -> Claimed {
        if !self.link.is_healthy() {
            return Claimed::Unavailable;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let store = self.link.store.clone();
        let network = self.network.clone();
        self.link.runtime().spawn(async move {
            let _ = tx.send(store.claim_address(&network, ip, mac, expires, None).await);
        });
        match rx.recv_timeout(CLAIM_WAIT) {
            Ok(Ok(Claim::Won | Claim::Held)) => Claimed::Granted,
            Ok(Ok(Claim::TakenBy(_))) => Claimed::Taken,
            Ok(Err(e)) => {
                tracing::warn!(network = %self.network, %ip, %mac, "cannot claim the address: {e}");
                self.link.set_unhealthy();
                Claimed::Unavailable
            }
            Err(_) => {
                tracing::warn!(network = %self.network, %ip, %mac, "etcd did not answer a claim in time");
                self.link.set_unhealthy();
                Claimed::Unavailable
            }
        }
    }
}
